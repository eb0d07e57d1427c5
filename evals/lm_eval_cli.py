"""lm-eval's own command line with the ``sparge-hf`` model: ``python -m evals.lm_eval_cli`` /
``sparge-lm-eval`` take exactly ``lm_eval``'s arguments.

lm-eval 0.4.13 has no plugin mechanism for models defined outside its source tree (its CLI knows
only the models registered when it starts; EleutherAI/lm-evaluation-harness issues #1621 and #3282),
so this entry point imports ``evals.lm_eval_adapter`` (which registers ``sparge-hf``) and then runs
lm-eval's CLI (``lm_eval.__main__.cli_evaluate``'s steps: logging, ``HarnessCLI``, parse, execute).
One addition: for ``--model sparge-hf`` with ``pretrained=<project model name>`` and no tokenizer in
``--model_args`` / ``--metadata``, the task metadata gets ``tokenizer=<the folder sparge-hf saves the
tokenizer to>``, because lm-eval's RULER tasks load their tokenizer by name (``AutoTokenizer``),
which a project name is not.

    sparge-lm-eval run --model sparge-hf --tasks niah_single_1 ruler_vt --device cuda \\
        --model_args pretrained=smollm2,method=sparge,config=runs/smollm2.json,max_length=8192 \\
        --metadata max_seq_lengths=[4096,8192]
    sparge-lm-eval run --model sparge-hf --tasks sparge_niah --include_path evals/tasks \\
        --model_args pretrained=smollm2,method=sparge-topk,topk=0.5 --metadata data_dir=runs/lm_eval_data
"""

from __future__ import annotations

import sys


def add_tokenizer_metadata(args) -> None:
    """Give RULER-style tasks the saved tokenizer folder of a project model name (see the docstring)."""
    from evals.lm_eval_adapter import MODEL_NAME, needs_tokenizer_folder, tokenizer_folder

    model_args = getattr(args, "model_args", None)
    if getattr(args, "model", None) != MODEL_NAME or not isinstance(model_args, dict):
        return
    metadata = getattr(args, "metadata", None) or {}
    name = model_args.get("pretrained")
    if not isinstance(name, str) or "tokenizer" in model_args or "tokenizer" in metadata:
        return
    if needs_tokenizer_folder(name):
        args.metadata = {**metadata, "tokenizer": str(tokenizer_folder(name))}


def main(argv: list[str] | None = None) -> None:
    import evals.lm_eval_adapter as adapter

    if not adapter.register():
        raise SystemExit(
            f"lm-eval is not installed (or {adapter.MODEL_NAME!r} is taken): {adapter.INSTALL_HINT}"
        )
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    add_tokenizer_metadata(args)
    parser.execute(args)


if __name__ == "__main__":
    main()
