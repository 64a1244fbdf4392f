"""Document sources: TFDS builders written as array_record, read without TensorFlow.

``dataset`` spec strings (the run config's ``dataset`` field):
  ``stdlib``                   embedded default corpus: this Python's own standard library
                               (the ``pydoc`` topic texts plus top-level module sources).
                               Ships with every Python; nothing is downloaded.
  ``files:<path>[,<path>...]`` local ``.txt``/``.md``/``.py``/... files, directories or globs;
                               ``.jsonl`` files give one document per line (field ``text_key``).
  ``tfds:<name>``              any TFDS catalog dataset, e.g. ``tfds:lm1b`` or
                               ``tfds:wikipedia/20230601.en``; prepared as array_record under
                               ``data_dir`` (needs network the first time).

Every source is a random-access sequence of documents (``len`` and ``[i]`` returning
``str``/``bytes``), which is what the deterministic index sampler in
``jaxllm.data.pipeline`` needs.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import zlib
from pydoc_data import topics

import numpy as np

from jaxllm.errors import DatasetError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
VALIDATION_EVERY = 50  # 1 in 50 files/documents (by content hash) goes to the validation split.


def default_data_dir() -> str:
    return os.environ.get(
        "JAXLLM_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "tfds")
    )


def split_documents(text: str, min_chars: int = 64) -> list[str]:
    """Splits a file into documents at runs of two blank lines (PEP 8 top-level breaks)."""
    docs = [d.strip("\n") for d in text.split("\n\n\n")]
    return [d for d in docs if len(d.strip()) >= min_chars]


def _split_of(key: str) -> str:
    return "validation" if zlib.crc32(key.encode()) % VALIDATION_EVERY == 0 else "train"


def stdlib_documents() -> list[tuple[str, str]]:
    """(key, text) pairs of the embedded corpus, in a fixed order."""
    out = []
    for name in sorted(topics.topics):
        out.append((f"pydoc/{name}", topics.topics[name].strip()))
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, doc in enumerate(split_documents(text)):
            out.append((f"{path.name}/{i}", doc))
    return out


def expand_paths(spec: str) -> list[pathlib.Path]:
    """Comma-separated files, directories (recursive, text suffixes + .jsonl) or globs."""
    files: list[pathlib.Path] = []
    for item in [s for s in spec.split(",") if s.strip()]:
        item = os.path.expanduser(item.strip())
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item, recursive=True))
            if not hits:
                raise DatasetError(f"dataset path {item!r} matches no files")
            files += [pathlib.Path(h) for h in hits if os.path.isfile(h)]
        elif os.path.isdir(item):
            found = sorted(
                p
                for p in pathlib.Path(item).rglob("*")
                if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")
            )
            if not found:
                raise DatasetError(
                    f"dataset directory {item!r} holds no {'/'.join(TEXT_SUFFIXES)}/.jsonl files"
                )
            files += found
        elif os.path.isfile(item):
            files.append(pathlib.Path(item))
        else:
            raise DatasetError(f"dataset path {item!r} does not exist")
    if not files:
        raise DatasetError(f"dataset 'files:{spec}' names no files")
    return files


def file_documents(files: list[pathlib.Path], text_key: str = "text") -> list[tuple[str, str]]:
    out = []
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{n + 1}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                        raise DatasetError(
                            f"{path}:{n + 1}: expected an object with a string field {text_key!r}"
                        )
                    out.append((f"{path}:{n}", record[text_key]))
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            docs = split_documents(text, min_chars=1)
            out += [(f"{path}/{i}", d) for i, d in enumerate(docs)]
    return out


def _fingerprint(files: list[pathlib.Path], text_key: str) -> str:
    h = hashlib.sha256(text_key.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@functools.cache
def _builder_class():
    """The TFDS builder, defined lazily so that importing this module stays light."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (tensorflow_datasets is slow to import: only when a corpus is read)

    class JaxllmText(tfds.core.GeneratorBasedBuilder):
        """Plain-text documents, one ``text`` feature per example, stored as array_record."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = []  # configs are made per corpus (see ``text_builder``)

        # No checksums/metadata files live next to this code. Saying so also avoids a
        # TFDS code path that needs the `importlib_resources` backport.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, documents=None, **kwargs):
            self._documents = documents
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="jaxllm text corpus",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            docs = self._documents() if callable(self._documents) else self._documents
            if docs is None:
                raise DatasetError(
                    f"dataset {self.builder_config.name} is not prepared and has no documents to write"
                )
            by_split = {"train": [], "validation": []}
            for key, text in docs:
                by_split[_split_of(key)].append((key, text))
            if not by_split["validation"]:  # tiny corpora: keep a validation split anyway
                by_split["validation"] = by_split["train"][-1:]
            return {name: self._generate_examples(items) for name, items in by_split.items()}

        def _generate_examples(self, items):
            for key, text in items:
                yield key, {"text": text}

    return JaxllmText


def text_builder(name: str, documents, data_dir: str):
    """A prepared TFDS builder for a corpus; prepares it on first use (array_record)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (tensorflow_datasets is slow to import: only when a corpus is read)

    cls = _builder_class()
    config = tfds.core.BuilderConfig(name=name, description=f"jaxllm corpus {name}")
    builder = cls(documents=documents, config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return builder


class TextSource:
    """Random-access documents from a TFDS data source (array_record, no TensorFlow)."""

    def __init__(self, data_source, text_key: str = "text", description: str = ""):
        self._src = data_source
        self._key = text_key
        self.description = description
        if len(self._src) == 0:
            raise DatasetError(f"dataset {description} is empty")

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int):
        record = self._src[int(i)]
        if isinstance(record, dict):
            if self._key not in record:
                raise DatasetError(
                    f"dataset {self.description} has no field {self._key!r}; "
                    f"fields: {sorted(record)} (set text_key=...)"
                )
            record = record[self._key]
        if isinstance(record, np.ndarray):
            record = record.item()
        return record


def load_source(
    spec: str, split: str = "train", *, data_dir: str | None = None, text_key: str = "text"
) -> TextSource:
    """Resolves a ``dataset`` spec (see module docstring) to a random-access source."""
    data_dir = data_dir or default_data_dir()
    kind, _, arg = spec.partition(":")
    if spec == "stdlib":
        name = f"stdlib_py{sys.version_info.major}{sys.version_info.minor}"
        builder = text_builder(name, stdlib_documents, data_dir)
        return TextSource(builder.as_data_source(split=split), "text", spec)
    if kind == "files" and arg:
        files = expand_paths(arg)
        name = "files_" + _fingerprint(files, text_key)
        builder = text_builder(name, lambda: file_documents(files, text_key), data_dir)
        return TextSource(builder.as_data_source(split=split), "text", spec)
    if kind == "tfds" and arg:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (tensorflow_datasets is slow to import: only when a corpus is read)

        try:
            src = tfds.data_source(
                arg, split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"}
            )
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; say what to do.
            raise DatasetError(
                f"could not open TFDS dataset {arg!r} split {split!r} in {data_dir}: {type(e).__name__}: {e}. "
                "Preparing a catalog dataset needs network access the first time."
            ) from e
        return TextSource(src, text_key, spec)
    raise DatasetError(
        f"dataset={spec!r} is not valid; allowed: 'stdlib', 'files:<path>[,<path>...]', 'tfds:<name>'"
    )
