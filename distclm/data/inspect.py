"""`distclm inspect OUT [--verify]`: what a prepared folder holds, and its first block decoded."""

from __future__ import annotations

from distclm.data.blocks import BlockReader
from distclm.errors import UserError


def inspect_command(inv) -> int:
    folder = inv.positional[0] if inv.positional else inv.cfg.data.dir
    if not folder:
        raise UserError("inspect needs a folder: distclm inspect OUT (or --data.dir=OUT)")
    verify = bool(inv.extras.get("verify"))
    reader = BlockReader(folder, verify=verify)
    try:
        print("\n".join(describe(folder, reader.manifest)))
        if verify:
            print("checksums  ok (sha256 of every shard matches the manifest)")
        split = next((s for s in reader.splits.values() if len(s)), None)
        if split is not None:
            print(f"first {split.name} block:")
            print(_decode(reader.manifest["tokenizer"]["name"], split[0].tolist()))
    finally:
        reader.close()
    return 0


def describe(folder: str, m: dict) -> list[str]:
    """The manifest as a few aligned lines: format, source, tokenizer, block shape, each split's counts."""
    src = m.get("source", {})
    lines = [f"folder     {folder}",
             f"format     {m['format']} v{m['version']} (distclm {m.get('distclm_version', '?')})",
             f"source     {src.get('source')} split={src.get('split')} field={src.get('text_field')} "
             f"max_docs={src.get('max_docs')} revision={src.get('revision')}",
             f"tokenizer  {m['tokenizer']['name']} sha256 {m['tokenizer']['sha256'][:16]}  vocab {m['vocab_size']}  "
             f"eos {m['eos_token_id']}",
             f"blocks     {m['block_size']} tokens, {m['dtype']}"]
    if m.get("data_format"):
        from distclm.data.prepare_chat import describe as describe_samples

        lines += describe_samples(m)
    for name, s in m["splits"].items():
        lines.append(f"{name:<10} {s['n_docs']:>9,} docs  {s['n_tokens']:>12,} tokens  {s['n_blocks']:>9,} blocks  "
                     f"{len(s['shards'])} shard(s)  dropped tail {s['dropped_tokens']} tokens")
    return lines


def _decode(tokenizer: str, ids: list[int]) -> str:
    try:
        from distclm.data.tokenize import load_hf_tokenizer

        hf, _ = load_hf_tokenizer(tokenizer)
        return hf.decode(ids)
    except UserError:
        return f"(tokenizer {tokenizer} not loadable here; ids) {ids}"
