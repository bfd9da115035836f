"""The benchmarks, as part of the package: each module is one benchmark, run as
``python -m blueedit.bench.<name>`` (or ``python -m blueedit.bench <name>``); :mod:`.harness`
holds what they share. Results go to ``benchmarks/results/`` of the checkout by default, each with
its run record (command, versions, git commit, times).
"""

#: Every benchmark: module name -> what it answers.
BENCHMARKS = {
    "speed": "the optimized against the reference path: time, memory and the same edit",
    "quality": "methods x strategies after sequential rounds (efficacy, generalization, specificity, fluency)",
    "sequence": "the long-sequence protocol through `blueedit fit`, resumable",
    "weight_shift": "the weight shift error against layer distance, batch size and sequence length",
    "vs_published": "side by side with the published BLUE code on the same model, C_0 and records",
    "lifelong": "lifelong editing, one edit per round, through `blueedit fit`",
    "layer_sweep": "MEMIT on candidate windows of critical layers",
    "locate_shapes": "`blueedit locate` on random weights of several architectures",
    "chat_template": "plain prompts against the chat template on an instruct model",
    "memory": "an estimate of the peak memory of a target optimization",
    "post_norm_gain": "the gain of a post-MLP norm on the output of W_out",
    "wise_sweep": "WISE settings on lifelong edits",
    "paired": "two arms on the same records: paired differences, bootstrap intervals, McNemar",
    "results_doc": "docs/results.md and the README's Results block from the committed results",
    "position0": "edits whose fact token is position 0: their count and metrics against the others",
    "cme": "compositional editing (A³E variants, baselines) on MAC and MQC built from PEAK",
    "a3e_lr_check": "A³E learning rates on the first MAC compositions",
}
