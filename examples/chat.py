"""Generate one chat reply on the embedded model (or any NemotronH checkpoint) and report tokens/s.

    python examples/chat.py
    python examples/chat.py --model /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B --prompt "Plan a trip"

The embedded model has random weights: its reply is noise, but every step (chat template,
tokenizer, prefill, incremental decode, detokenization) is the real path.
"""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--model", "model_name", default="tiny", show_default=True, help="'tiny' or a checkpoint directory")
@click.option("--prompt", default="Which truck should take the order to the north depot?", show_default=True)
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0))
@click.option("--seed", default=0, show_default=True)
@click.option("--think/--no-think", default=False, show_default=True, help="open a reasoning block")
def main(model_name: str, prompt: str, max_tokens: int, temperature: float, seed: int, think: bool) -> None:
    import torch

    from agentrt.model import generate, load
    from agentrt.model.tokenizer import IncrementalDecoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    lm = load(model_name)
    messages = [
        {"role": "system", "content": "You are a dispatcher for a delivery fleet. Answer briefly."},
        {"role": "user", "content": prompt},
    ]
    prompt_ids = lm.chat_format.render(messages, enable_thinking=think)
    click.echo(f"model: {lm.path} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters, "
               f"{lm.model.dtype}, {lm.model.device}); loaded in {time.perf_counter() - t0:.2f}s")
    click.echo(f"prompt: {len(prompt_ids)} tokens\n--- reply ---")

    decoder = IncrementalDecoder(lm.tokenizer)
    tokens, t_first = [], None
    t_start = time.perf_counter()
    for tok, _ in generate(lm.model, prompt_ids, max_tokens, temperature=temperature, seed=seed,
                           stop_ids=lm.eos_token_ids):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(tok)
        click.echo(decoder.push(tok), nl=False)
    t_end = time.perf_counter()
    click.echo(decoder.flush(), nl=False)
    parsed = lm.chat_format.parse(lm.tokenizer.decode(tokens, skip_special_tokens=False), thinking_open=think)
    decode_s = t_end - t_first
    click.echo("\n--- stats ---")
    click.echo(f"prefill: {len(prompt_ids)} tokens in {t_first - t_start:.3f}s "
               f"({len(prompt_ids) / (t_first - t_start):.0f} tok/s)")
    rate = (len(tokens) - 1) / decode_s if decode_s > 0 else float("nan")
    click.echo(f"decode: {len(tokens)} tokens; {len(tokens) - 1} after the first in {decode_s:.3f}s ({rate:.1f} tok/s)")
    click.echo(f"parsed: {len(parsed.content)} chars of content, {len(parsed.tool_calls)} tool calls, "
               f"{len(parsed.errors)} malformed calls")


if __name__ == "__main__":
    main()
