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
            print(f"checksums  ok (sha256 of every shard matches the manifest; every id < vocab_size "
                  f"{reader.vocab_size})")
        split = next((s for s in reader.splits.values() if len(s)), None)
        if split is not None and split.masked:
            print(f"first {split.name} block, the tokens that get loss between [[ and ]]:")
            print(_decode_marked(reader.manifest, split[0].tolist(), split.flags([0])[0]))
        elif split is not None:
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


def _decode_marked(m: dict, ids: list[int], flags) -> str:
    """A masked block decoded run by run: the runs of labels between [[ and ]] (the padding left out)."""
    from distclm.data.blocks import LOSS, START

    tokenizer, last = m["tokenizer"]["name"], max(i for i in range(len(ids)) if flags[i] & START)
    if last and all(t == m["eos_token_id"] for t in ids[last:]):  # the padding: EOS ids, a segment of their own
        ids, flags = ids[:last], flags[:last]
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(flags[i] & LOSS) != bool(flags[start] & LOSS):
            runs.append((start, i, bool(flags[start] & LOSS)))
            start = i
    text = [(_decode(tokenizer, ids[a:b]), labelled) for a, b, labelled in runs]
    return "".join(f"[[{t}]]" if labelled else t for t, labelled in text)


def _decode(tokenizer: str, ids: list[int]) -> str:
    try:
        from distclm.data.tokenize import load_hf_tokenizer

        hf, _ = load_hf_tokenizer(tokenizer)
        return hf.decode(ids)
    except UserError:
        return f"(tokenizer {tokenizer} not loadable here; ids) {ids}"
