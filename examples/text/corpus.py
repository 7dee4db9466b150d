"""The English corpus of the text model: the prose of the Python 3.11 documentation, from Debian's `python3.11-doc`.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python examples/text/corpus.py /tmp/pydoc --out runs/text-data     # corpus.jsonl + tokenizer.json

The package ships the reStructuredText sources of the documentation (usr/share/doc/python3.11/html/_sources/**
/*.rst.txt; licence: the PSF License Agreement, Python's own, see usr/share/doc/python3.11-doc/copyright). From each
file the prose is kept and the markup dropped, so the model learns English and not reStructuredText: paragraphs are
unwrapped into one line each, inline roles (:func:`len`, ``code``, `link <url>`_, **bold**) become their text, and
code samples, directives, tables, comments and heading underlines are dropped. A document is one source file; the
files whose index in sorted order is a multiple of HELD_OUT_EVERY are held out (never trained on) for evaluation and
the quality yardstick.

The tokenizer is a byte-level BPE trained with `tokenizers` on the training documents only (the held-out ones stay
unseen), so any text round-trips, with <pad> <eos> <bos> <unk> at ids 0..3 (the Sudoku vocabulary's order).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HELD_OUT_EVERY = 25
SOURCES = "usr/share/doc/python3.11/html/_sources"

_UNDERLINE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}\s*$")
_ROLE = re.compile(r":[a-zA-Z:+\-]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")     # :func:`len`, :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")                         # `text <url>`_
_PLAIN_LINK = re.compile(r"`([^`]+)`_+")                                  # `name`_
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_SUBST = re.compile(r"\|([^|\s][^|]*)\|")


def inline_text(line: str) -> str:
    """A line's inline markup replaced by the text it renders as."""
    line = _ROLE.sub(lambda m: m.group(1).strip(), line)
    line = _LINK.sub(r"\1", line)
    line = _PLAIN_LINK.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2), line)
    line = _SUBST.sub(r"\1", line)
    return line.replace("\\", "")


def is_prose(text: str) -> bool:
    """A paragraph of English: a few words, mostly letters and spaces, not a code line or a table row."""
    words = text.split()
    if len(words) < 4 or text.startswith((">>>", "...", "$ ", "+-", "|", "#", "(", "{", "[")):
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters >= 0.8 * len(text)


def paragraphs(source: str) -> list[str]:
    """The prose paragraphs of one reStructuredText file (blocks separated by blank lines), markup removed. A
    heading (a line over an underline) is kept as its own line; the literal block that follows a paragraph ending
    in "::" is dropped, and the "::" renders as ":" (or nothing after a space), as Sphinx renders it."""
    out, block, skip_literal = [], [], False

    def flush():
        nonlocal skip_literal
        if not block:
            return
        indented = block[0][:1].isspace()
        lines = [b.strip() for b in block]
        block.clear()
        if indented and skip_literal:          # a code sample
            return
        skip_literal = False
        if lines[0].startswith(".."):           # a directive, comment or target
            return
        heading = [ln for ln in lines if not _UNDERLINE.match(ln)]
        if len(heading) < len(lines):          # a title: the text between its over/underlines
            text = " ".join(heading)
            if text and is_prose(text + " a b c"):
                out.append(" ".join(inline_text(text).split()))
            return
        text = " ".join(lines)
        if text.endswith("::"):
            skip_literal = True
            text = text[:-2].rstrip() + ("" if text[-3:-2].isspace() else ":")
        text = " ".join(inline_text(text).split())   # reStructuredText's two spaces after a sentence: one
        if is_prose(text):
            out.append(text)

    for line in source.splitlines():
        if not line.strip():
            flush()
        else:
            if block and line[:1].isspace() != block[0][:1].isspace():
                flush()                        # an indented block right under a line: its own paragraph
            block.append(line.rstrip())
    flush()
    return out


def documents(root: str | Path) -> list[tuple[str, str]]:
    """(relative path, prose text) for every source file under `root` (an extracted python3.11-doc), sorted by path;
    paragraphs are joined by a blank line. Files with less than 200 characters of prose are skipped."""
    base = Path(root) / SOURCES
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: not found (extract python3.11-doc with dpkg-deb -x first)")
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        text = "\n\n".join(paragraphs(path.read_text(encoding="utf-8", errors="replace")))
        if len(text) >= 200:
            docs.append((str(path.relative_to(base)), text))
    return docs


def split(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training documents, held-out documents): every HELD_OUT_EVERY-th document is held out."""
    return ([d for i, d in enumerate(docs) if i % HELD_OUT_EVERY],
            [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0])


def train_tokenizer(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json trained on `texts`: <pad> <eos> <bos> <unk> at ids 0..3, a post-processor that
    puts <bos> before a text (the prompt format: <bos> then plain text, no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok.to_str()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="the extracted python3.11-doc package (the folder holding usr/)")
    ap.add_argument("--out", required=True, help="folder for corpus.jsonl, heldout.jsonl and tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args(argv)
    docs = documents(args.root)
    train, held = split(docs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("corpus.jsonl", train), ("heldout.jsonl", held)):
        with (out / name).open("w", encoding="utf-8") as f:
            for path, text in part:
                f.write(json.dumps({"source": path, "text": text}, ensure_ascii=False) + "\n")
    (out / "tokenizer.json").write_text(train_tokenizer([t for _, t in train], args.vocab_size), encoding="utf-8")
    chars = sum(len(t) for _, t in train)
    print(f"{len(train)} training documents ({chars / 1e6:.2f}M characters), {len(held)} held out; "
          f"tokenizer of {args.vocab_size} tokens -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
