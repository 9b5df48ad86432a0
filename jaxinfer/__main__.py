"""Command line: `python -m jaxinfer generate [--model PATH] [--chat] "prompt"` streams text."""

from __future__ import annotations

import argparse
import sys

DEFAULT_PROMPT_HELP = "the prompt text"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    gen.add_argument("prompt", help=DEFAULT_PROMPT_HELP)
    gen.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file or jaxinfer checkpoint (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on a GPU, float32 on a CPU",
    )
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    return parser


def generate_command(args) -> int:
    import jaxinfer
    from jaxinfer.platform import log_device
    from jaxinfer.tokenizer import IncrementalDetokenizer, encode_prompt

    log_device()
    model = jaxinfer.load_model(args.model, dtype=args.dtype)
    prompt = encode_prompt(model.tokenizer, args.prompt, chat=args.chat)
    detok = IncrementalDetokenizer(model.tokenizer)
    for token in jaxinfer.stream(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return generate_command(args)
    except (ValueError, OSError) as e:  # bad input or an unreadable model: one line, no traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxinfer: error: {message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency: name it, no traceback
        print(
            f"jaxinfer: error: this needs the Python package {e.name!r}, which is not installed "
            f"(pip install {e.name})",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
