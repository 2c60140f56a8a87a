"""JSON documents, pretty-printed with 2-space indentation.

* ``botocore_json`` -- AWS API models from the botocore wheel (service
  definitions, paginators, waiters, examples). The endpoint rule sets are
  machine-generated decision trees and are left out. A few services (EC2,
  SageMaker) are megabytes each, so every file is cut at ``max_chars``.
* ``iso_codes_json`` -- the ISO code tables of Debian's ``iso-codes`` package,
  present on every Debian machine. Each table is one big array; it is cut into
  documents of ``chunk`` entries so that the domain has enough documents to
  split into train and validation.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections.abc import Iterator

from moe_testbed.data.packages import Deb, PyPI
from moe_testbed.data.sources.base import Doc, Source, SourceEnv, decode, register, truncate_lines


def pretty(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)


@register
class BotocoreJson(Source):
    name = "botocore_json"
    domain = "json"
    licence = "Apache-2.0"
    description = "AWS API models (botocore 1.44.5 wheel: service, paginators, waiters, examples), pretty-printed"
    packages = (
        PyPI(
            "botocore",
            "1.44.5",
            "botocore-1.44.5-py3-none-any.whl",
            "8f16a56d1dff125dd65322ae021efa7ba5195a6db5102b96862566055b748921",
        ),
    )
    include = re.compile(r"^botocore/data/.*/(service-2|paginators-1|waiters-2|examples-1)\.json(\.gz)?$")
    max_chars = 60_000

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        with zipfile.ZipFile(env.artifact("botocore")) as zf:
            for info in zf.infolist():
                if not self.include.search(info.filename):
                    continue
                raw = zf.read(info)
                if info.filename.endswith(".gz"):
                    raw = gzip.decompress(raw)
                text, bad = decode(raw, env.encoding_errors, info.filename)
                try:
                    text = pretty(json.loads(text))
                except ValueError:
                    continue  # not JSON after all: skip rather than teach broken JSON
                yield Doc(info.filename, truncate_lines(text, self.max_chars), bad)


@register
class IsoCodesJson(Source):
    name = "iso_codes_json"
    domain = "json"
    licence = "LGPL-2.1-or-later"
    description = "ISO 639/3166/4217/15924 code tables (iso-codes), in documents of 40 entries"
    packages = (Deb("iso-codes"),)
    chunk = 40
    min_chars = 100

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        root = env.deb_path("iso-codes", "/usr/share/iso-codes/json")
        for path in sorted(root.glob("iso_*.json")):
            text, bad = decode(path.read_bytes(), env.encoding_errors, str(path))
            data = json.loads(text)
            for key, entries in data.items():
                if not isinstance(entries, list):
                    continue
                for i in range(0, len(entries), self.chunk):
                    yield Doc(
                        f"{path.name}[{key}][{i}]", pretty({key: entries[i : i + self.chunk]}), bad if i == 0 else 0
                    )
