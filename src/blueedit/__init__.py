"""blueedit: locate-then-edit knowledge editing with BLUE (Boundary Layer UpdatE)."""

__version__ = "0.1.0"
