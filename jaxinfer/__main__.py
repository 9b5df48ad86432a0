"""Command line: `python -m jaxinfer generate [--model PATH] [--chat] "prompt"` streams text.

`--tensor-parallel-size N` splits the model over N devices; over several hosts, run the same
command in every process with `--coordinator-address/--num-processes/--process-id` (or the
$JAXINFER_* variables, or under SLURM nothing: see jaxinfer/distributed.py): every process
computes, process 0 prints.
"""

from __future__ import annotations

import argparse
import os
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
    gen.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="devices to split the model over (with several processes: all of theirs together)",
    )
    hosts = gen.add_argument_group(
        "several hosts", "default: $JAXINFER_COORDINATOR_ADDRESS etc., or a SLURM / MPI job"
    )
    hosts.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    hosts.add_argument("--num-processes", type=int, default=None, help="processes in all")
    hosts.add_argument("--process-id", type=int, default=None, help="this one's, from 0")
    return parser


def generate_command(args) -> int:
    from jaxinfer import distributed

    several = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    import jaxinfer
    from jaxinfer.platform import log_device
    from jaxinfer.tokenizer import IncrementalDetokenizer, encode_prompt

    params = sampling_params(args)  # bad sampling arguments fail before the model loads
    log_device()
    model = jaxinfer.load_model(
        args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size
    )
    prompt = encode_prompt(model.tokenizer, args.prompt, chat=args.chat)
    detok = IncrementalDetokenizer(model.tokenizer, prompt_ids=prompt)
    tokens = (
        engine_tokens(model, prompt, params) if several else stream_tokens(model, prompt, params)
    )
    out = sys.stdout if jax.process_index() == 0 else None  # the others compute the same
    for token in tokens:
        text = detok.push(token)
        if out is not None:
            out.write(text)
            out.flush()
    if out is not None:
        out.write(detok.flush() + "\n")
    return 0


def sampling_params(args):
    """The command's sampling arguments, checked (ValueError naming a bad one)."""
    from jaxinfer import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:  # named as the user wrote it: the flag, not the field
        field, _, rest = str(e).partition(" ")
        flag = "--max-new-tokens" if field == "max_tokens" else "--" + field.replace("_", "-")
        raise ValueError(f"{flag} {rest}") from None


def stream_tokens(model, prompt: list[int], params):
    """The new tokens of `jaxinfer.stream` (one process)."""
    import jaxinfer

    return jaxinfer.stream(
        model,
        prompt,
        max_new_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
    )


def engine_tokens(model, prompt: list[int], params):
    """The new tokens from the engine, step by step: with several processes, each runs the
    same steps (`stream` is one process's program)."""
    from jaxinfer import Engine

    engine = Engine(model, max_num_seqs=1, warmup=False)
    engine.add_request("cli", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            yield from out.new_token_ids


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return generate_command(args)
    except BrokenPipeError:  # the reader left (`| head`): quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 0
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
