"""Compression of the trained tokenizer: bytes per token on prose, code, math, non-English and the training corpus,
side by side with GPT-2 and GPT-4 (cl100k_base) when tiktoken has them in its cache ($TIKTOKEN_CACHE_DIR; never
downloaded here).

    python -m scripts.tok_eval                       # <base dir>/tokenizer, on the corpus it was trained on
    python -m scripts.tok_eval --data-path embedded --max-chars 1e6
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tiktoken

from nanochat_jax.report import writer as report
from nanochat_jax.core.common import ArgumentParser, UserError, parse_args, print0, run_main
from nanochat_jax.data.documents import describe_embedded, iter_documents
from nanochat_jax.data.tokenizer import Tokenizer, tokenizer_dir

# -----------------------------------------------------------------------------------------------------------------
# Samples of each kind of text (written for this script)

SAMPLES = {
    "prose": """The old lighthouse keeper had watched the sea for forty years, and in all that time he had never seen
a storm like the one that came in from the west that autumn. It began as a low grey line on the horizon, hardly
worth noticing, but by evening the wind was tearing slates from the roof and the waves were breaking over the rocks
where the seals usually slept. He lit the lamp early, checked the oil twice, and sat by the window with a mug of tea
going cold in his hands. "It'll pass," he told the cat, who did not believe him either.""",
    "code": '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping [start, end) intervals; the result is sorted."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


if __name__ == "__main__":
    print(merge_intervals([(1, 3), (2, 6), (8, 10), (15, 18)]))  # [(1, 6), (8, 10), (15, 18)]
''',
    "math": r"""Let $f(x) = x^3 - 6x^2 + 11x - 6$. Then $f(1) = 0$, $f(2) = 0$ and $f(3) = 0$, so
$f(x) = (x-1)(x-2)(x-3)$. The derivative is $f'(x) = 3x^2 - 12x + 11$, with roots $x = 2 \pm \frac{1}{\sqrt{3}}$.
For the integral, $\int_0^1 f(x)\,dx = \frac{1}{4} - 2 + \frac{11}{2} - 6 = -2.25$.
Also 12345 * 6789 = 83810205 and 3.14159 / 2.71828 = 1.15573.""",
    "non-english": """Der schnelle braune Fuchs springt über den faulen Hund, und niemand weiß, warum.
Le petit déjeuner était prêt à sept heures, mais personne n'avait faim ce matin-là.
El tren salió de la estación con veinte minutos de retraso y llegó a Sevilla de noche.
Быстрая коричневая лиса перепрыгивает через ленивую собаку.
今日は天気がとても良いので、公園まで散歩に行きました。
我们明天早上九点在图书馆门口见面。
오늘 저녁에는 친구들과 함께 한국 음식을 먹을 거예요.
ضحك الأطفال كثيرًا عندما رأوا القطة تلعب بالكرة.""",
}

# tiktoken's download addresses for the reference encodings (its cache names each file sha1(address))
REFERENCE_FILES = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}
REFERENCE_LABELS = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps the files it downloads, by its own rule (tiktoken.load.read_file_cached):
    $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache; "" turns its cache off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def reference_encoding(name: str):
    """(tiktoken's encoding `name`, None) when its files are in tiktoken's cache, which tiktoken reads without a
    network; else (None, why not). Nothing is downloaded here: an evaluation never waits on a network."""
    cache = tiktoken_cache_dir()
    if not cache:
        return None, "tiktoken's cache is off (TIKTOKEN_CACHE_DIR is empty)"
    files = [os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()) for u in REFERENCE_FILES[name]]
    if not all(os.path.exists(f) for f in files):
        return None, (f"not in tiktoken's cache {cache}; to compare, point TIKTOKEN_CACHE_DIR at a cache that has it, "
                      f"or fill this one online: python -c 'import tiktoken; tiktoken.get_encoding(\"{name}\")'")
    try:
        return tiktoken.get_encoding(name), None
    except Exception as e:  # a corrupt cached file makes tiktoken fetch it again, which fails offline
        return None, f"tiktoken could not load it from its cache {cache} ({type(e).__name__}: {e})"


def corpus_text(source, max_chars: int) -> str:
    docs, total = [], 0
    for doc in iter_documents(source):
        docs.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return "\n".join(docs)[:max_chars]


def main(argv=None):
    # -----------------------------------------------------------------------------------------------------------
    # Arguments
    parser = ArgumentParser(description="Bytes per token of the trained tokenizer vs GPT-2/GPT-4",
                             doc=__doc__)
    parser.add_argument("--tokenizer-dir", default=None, help="default: <base dir>/tokenizer")
    parser.add_argument("--data-path", default=None,
                        help="corpus to measure (default: the one the tokenizer was trained on)")
    parser.add_argument("--max-chars", type=float, default=2e6, help="characters of the corpus to encode")
    args = parse_args(parser, "tok_eval", argv)
    path = Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {path}: run `python -m scripts.tok_train` first")
    ours = Tokenizer.from_directory(path)
    source = args.data_path
    if source is None:
        info_path = path / "train_info.json"
        source = json.loads(info_path.read_text())["data_path"] if info_path.is_file() else "shards"

    # -----------------------------------------------------------------------------------------------------------
    # Texts and encoders
    texts = dict(SAMPLES)
    if source == "embedded":
        print0(describe_embedded())
    texts[f"corpus ({source})"] = corpus_text(source, int(args.max_chars))
    encoders = {f"ours ({ours.get_vocab_size():,})": lambda t: ours.encode(t)}
    for name, label in REFERENCE_LABELS.items():
        enc, why = reference_encoding(name)
        if enc is None:
            print0(f"{label} ({name}): skipped: not available offline ({why})")
        else:
            encoders[f"{label} ({enc.n_vocab:,})"] = lambda t, enc=enc: enc.encode_ordinary(t)

    # -----------------------------------------------------------------------------------------------------------
    # Bytes per token, side by side (higher = better compression)
    rows = []
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        row = {"text": kind, "bytes": n_bytes}
        for label, encode in encoders.items():
            n_tokens = len(encode(text))
            row[f"{label} tokens"] = n_tokens
            row[f"{label} bytes/token"] = n_bytes / max(n_tokens, 1)
        rows.append(row)
    width = max(len(r["text"]) for r in rows) + 2
    labels = list(encoders)
    print0("bytes/token (higher is better)")
    print0(f"{'text':<{width}}{'bytes':>10}" + "".join(f" {lab:>21}" for lab in labels))
    for r in rows:
        print0(f"{r['text']:<{width}}{r['bytes']:>10,}"
               + "".join(f" {r[f'{lab} bytes/token']:>9.3f} ({r[f'{lab} tokens']:>9,})" for lab in labels))
    report.log("Tokenizer evaluation", [{"tokenizer": str(path), "fingerprint": ours.fingerprint()}, {"rows": rows}])
    return rows


if __name__ == "__main__":
    run_main(main)
