from blueedit.cli import main

main()
