"""Built-in sources: one small class per source, registered by name.

Importing this package registers every source in :data:`SOURCES`
(``name -> class``). Families live one per module: plain files, man pages,
Bibles, fortunes, archives, JSON, SQL tests, Metamath.
"""

from moe_testbed.data.sources import archives, bible, files, fortunes, jsondata, manpages, metamath, mysqltest
from moe_testbed.data.sources.base import SOURCES, Doc, Source, SourceEnv, doc_key, get_source, register

__all__ = [
    "SOURCES",
    "Doc",
    "Source",
    "SourceEnv",
    "doc_key",
    "get_source",
    "register",
    "archives",
    "bible",
    "files",
    "fortunes",
    "jsondata",
    "manpages",
    "metamath",
    "mysqltest",
]
