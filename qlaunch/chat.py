"""Chat with a base model plus a trained adapter, loaded the way it was trained.

    python -m qlaunch.chat --adapter OUT [--base MODEL] [--prompt "Opposite of hot?"]

Without --prompt it is interactive (empty line or Ctrl-D quits, /reset clears the history).
Tokens are streamed as they are generated.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from qlaunch.config.domains import CHAT, CommandParser
from qlaunch.config.errors import UsageError
from qlaunch.model.inference import reply


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser("qlaunch.chat", CHAT, description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="adapter directory (a LoRA / Q-LoRA run's output_dir)")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "nf4", "fp4", "gptq"],
                        help="how to load the base (auto: as the adapter was trained)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base checkpoint (needed when training needed it)")
    parser.add_argument("--system", default="You are a helpful assistant.", help="system prompt ('' for none)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    try:
        from qlaunch.model.inference import load_for_inference

        # gptqmodel (GPTQ bases) logs its banner and kernel choice on stdout; stdout is for the reply.
        with contextlib.redirect_stdout(sys.stderr):
            model, tokenizer = load_for_inference(args.base, args.adapter, args.quantization,
                                                  trust_remote_code=args.trust_remote_code)
    except UsageError as e:
        print(e.render("qlaunch.chat"), file=sys.stderr)
        sys.exit(2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stream": True}
    if args.prompt is not None:
        reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}], **kwargs)
        return
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, system + history, **kwargs)})


if __name__ == "__main__":
    main()
