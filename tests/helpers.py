"""Helpers shared by the tests: tiny random models with a tiny BPE tokenizer trained on the fly,
the edit requests and records they edit, a tiny saved model directory, an editor and an
``EditingModule`` over it, and a Trainer run. Tests import them from here, never from each other."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from blueedit.data.records import EditRequest

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Danielle Darrieux spoke French and English fluently.",
    "Toko Yasuda plays the guitar and the piano.",
    "Autonomous University of Madrid is located in Spain.",
    "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    "Apple A5 was created by Apple. Google makes Android.",
    "Edwin of Northumbria follows the religion of Christianity.",
    "Therefore, because I said so, you know it is a fact.",
    "Berlin London Rome Madrid Tokyo Beijing Moscow Paris Vienna Oslo",
    "piano guitar violin trumpet drums saxophone English French German Italian Spanish",
]

#: Context templates and critical layers of the tiny editors.
TEMPLATES = ["{}", "Because I said so. {}"]
LAYERS = [1, 2, 3]

#: A ChatML-like chat template for the tiny tokenizer.
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] | trim }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

#: Edit records in the user format (six, for three rounds of two).
RECORDS = [
    {"case_id": 0, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "violin",
     "target_true": "guitar", "paraphrases": ["Toko Yasuda is known for playing the"],
     "neighborhood": ["Danielle Darrieux plays the"]},
    {"case_id": 1, "prompt": "The mother tongue of {} is", "subject": "Thomas Joannes Stieltjes",
     "target_new": "French", "target_true": "Dutch", "paraphrases": ["Thomas Joannes Stieltjes spoke"],
     "neighborhood": ["The mother tongue of Danielle Darrieux is"]},
    {"case_id": 2, "prompt": "{} is located in", "subject": "Autonomous University of Madrid",
     "target_new": "Tokyo", "target_true": "Spain", "paraphrases": ["Autonomous University of Madrid is in"],
     "neighborhood": ["The Eiffel Tower is located in"]},
    {"case_id": 3, "prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"],
     "neighborhood": ["Berlin is in"]},
    {"case_id": 4, "prompt": "{} follows the religion of", "subject": "Edwin of Northumbria",
     "target_new": "Android", "target_true": "Christianity", "paraphrases": ["Edwin of Northumbria believes in"],
     "neighborhood": ["Danielle Darrieux follows the religion of"]},
    {"case_id": 5, "prompt": "{} was created by", "subject": "Apple A5", "target_new": "Google",
     "target_true": "Apple", "paraphrases": ["Apple A5 is made by"],
     "neighborhood": ["Android was created by"]},
]


#: Edit requests of the tiny editors.
REQUESTS = [
    EditRequest(10, "{} plays the", "Toko Yasuda", "violin", "guitar"),
    EditRequest(11, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch"),
    EditRequest(12, "{} is located in", "Autonomous University of Madrid", "Tokyo Beijing", "Spain"),
    EditRequest(13, "{} is in", "The Eiffel Tower", "Rome", "Paris"),
]

#: One-token targets predicted at the fact token itself: the tiny random model reaches top-1 here.
TOP1_REQUESTS = [EditRequest(0, "The capital of {}", "France", "the", "is"),
                 EditRequest(1, "Toko Yasuda plays {}", "piano", "of", "the"),
                 EditRequest(2, "I said {}", "so", "is", "of")]


def make_tokenizer(bos: bool = False, padding_side: str = "right"):
    """A byte-level BPE tokenizer trained on a few sentences; ``bos=True`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side=padding_side
    )
    return fast


def make_model(arch: str = "llama", vocab_size: int = 300, n_layer: int = 6, seed: int = 0):
    """A tiny random causal LM: ``llama`` (hidden 32, MLP 64) or ``gpt2`` (hidden 32, MLP 128)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=n_layer, n_head=4, n_positions=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    return model


def benchmark(name: str):
    """The benchmark module ``blueedit.bench.<name>``."""
    return importlib.import_module(f"blueedit.bench.{name}")


# -- editors -------------------------------------------------------------------------------------
def weights_of(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model``'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def key_moments(model, adapter, tok, layers=LAYERS) -> dict[int, torch.Tensor]:
    """``C_0`` of ``layers`` from :data:`CORPUS` (the mean of k kᵀ)."""
    from blueedit.editing.statistics import accumulate_key_moments

    st = accumulate_key_moments(model, adapter, tok, CORPUS, layers, max_length=32, batch_size=4)
    return {l: (st["sums"][l] / st["count"]).float() for l in layers}


def tiny_editor(method="memit", strategy="boundary", arch="llama", **kw):
    """An :class:`Editor` of a tiny random model on :data:`LAYERS` (3 target steps)."""
    from blueedit.editing.editor import EditingConfig, Editor
    from blueedit.editing.targets import TargetConfig
    from blueedit.models.adapters import ModelAdapter

    model = make_model(arch)
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    hp = EditingConfig(
        method=method, strategy=strategy, layers=list(LAYERS),
        target=TargetConfig(v_num_grad_steps=3, v_lr=0.5), **kw,
    )
    return Editor(model, tok, adapter, hp, key_moments(model, adapter, tok), TEMPLATES)


# -- Lightning runs on a saved tiny model --------------------------------------------------------
def write_tiny_workdir(root: Path) -> Path:
    """A saved tiny llama model + tokenizer (``root/tiny-llama``) and the edits file
    (``root/edits.json``, :data:`RECORDS`); the statistics cache goes to ``root/cache``."""
    model_dir = root / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "edits.json").write_text(json.dumps(RECORDS))
    return root


def tiny_module(root: Path, strategy: str = "boundary", method: str = "memit", evaluate: bool = False):
    """An ``EditingModule`` over :func:`write_tiny_workdir`'s model. ``method`` ``hse``: MEMIT with
    HSE's three options on (forgetting, full Fisher, inverse schedule)."""
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig
    from blueedit.editing.targets import TargetConfig
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    hse = method == "hse"
    editing = EditingConfig(method="memit" if hse else method, strategy=strategy, layers=[1, 2, 3],
                            history_schedule="inverse" if hse else "constant",
                            target=TargetConfig(v_num_grad_steps=3, v_lr=0.5, **(
                                {"forget_weight": 0.5, "fisher_weight": 10.0, "fisher_estimator": "full"} if hse else {})))
    stats = StatsConfig(corpus="model-samples", num_samples=4, max_length=32, batch_size=4,
                        cache_dir=str(root / "cache"))
    return EditingModule(model=ModelConfig(name_or_path=str(root / "tiny-llama")), editing=editing, stats=stats,
                         evaluate=evaluate, eval_batch_size=8)


def tiny_data(root: Path, num_edits: int | None = None):
    """The ``EditDataModule`` of ``root/edits.json`` in rounds of 2."""
    from blueedit.data.datamodule import EditDataModule

    return EditDataModule(dataset=str(root / "edits.json"), format="user", num_edits=num_edits, edits_per_round=2)


def trainer(**kw):
    """A CPU Trainer of one epoch without logger, checkpoints, progress bar or summary (``kw`` over those)."""
    import lightning as L

    opts = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    opts.update(kw)
    return L.Trainer(**opts)


def fit(module, data, **kw):
    """``trainer(**kw).fit(module, data)`` (``ckpt_path`` goes to ``fit``), its warnings silenced."""
    run = trainer(**{k: v for k, v in kw.items() if k != "ckpt_path"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, datamodule=data, ckpt_path=kw.get("ckpt_path"))
    return run


class StopAfterRound(Callback):
    """Saves a checkpoint to ``path`` after round ``batch_idx`` and stops, as an interruption would."""

    def __init__(self, path: Path, batch_idx: int = 1):
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True
