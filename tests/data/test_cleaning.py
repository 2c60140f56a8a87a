"""Each extractor's cleaning rules, on small synthetic inputs."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from moe_testbed.data.errors import DataError
from moe_testbed.data.packages import Deb, Resolved
from moe_testbed.data.sources import SourceEnv, get_source
from moe_testbed.data.sources.base import decode, normalize, truncate_lines
from moe_testbed.data.sources.bible import clean_verse_text, parse_plain
from moe_testbed.data.sources.fortunes import group_entries, join_fortunes
from moe_testbed.data.sources.manpages import clean_rendered, is_so_stub, render_page
from moe_testbed.data.sources.metamath import split_sections, strip_proofs
from moe_testbed.data.sources.mysqltest import clean_mysqltest

RENDERED_DE = """\
MCOOKIE(1)                 Dienstprogramme für Benutzer                MCOOKIE(1)

BEZEICHNUNG
       mcookie - magische Cookies für xauth erzeugen

BESCHREIBUNG
       mcookie erzeugt eine 128-Bit-Zufallszahl.

ÜBERSETZUNG
       Die deutsche Übersetzung wurde von Mario Blättermann
       <mario.blaettermann@gmail.com> erstellt.

SIEHE AUCH
       md5sum(1), xauth(1)

util-linux 2.38.1                 11. Mai 2022                         MCOOKIE(1)
"""


def test_man_page_drops_header_footer_and_translator_section():
    text = clean_rendered(RENDERED_DE)
    assert text.startswith("BEZEICHNUNG")
    assert "MCOOKIE(1)" not in text  # running header and footer
    assert "ÜBERSETZUNG" not in text and "Blättermann" not in text
    assert "SIEHE AUCH" in text and "md5sum(1)" in text  # the section after it stays


@pytest.mark.parametrize("heading", ["TRADUCTION", "ПЕРЕВОД", "TRADUCCIÓN", "COLOPHON", "この文書について"])
def test_man_page_drops_every_translator_heading(heading):
    page = f"X(1)  h  X(1)\n\nNAME\n       x - y\n\n{heading}\n       someone <a@b.c>\n\nfooter  X(1)\n"
    text = clean_rendered(page)
    assert heading not in text and "a@b.c" not in text and "x - y" in text


def test_man_so_stub_is_detected():
    assert is_so_stub(b".so man3/printf.3\n")
    assert not is_so_stub(b".TH LS 1\n.SH NAME\nls \\- list\n.so other\n" + b"x\n" * 50)


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_man_renders_a_page_to_plain_text(tmp_path):
    page = tmp_path / "demo.1"
    page.write_text(
        '.TH DEMO 1 "2024" "demo 1.0" "Demo Manual"\n.SH NAME\ndemo \\- a \\fBbold\\fR page\n'
        ".SH DESCRIPTION\nÜberall schöne Wörter.\n.SH ÜBERSETZUNG\nJemand <j@x.de>\n"
    )
    raw = render_page(page)
    text = clean_rendered(raw.decode("utf-8"))
    assert "demo - a bold page" in text and "schöne Wörter" in text
    assert "\b" not in text and "\x1b" not in text  # no overstrike or colour codes
    assert "j@x.de" not in text and "DEMO(1)" not in text


def test_man_symlinks_are_skipped(tmp_path, monkeypatch):
    from moe_testbed.data.sources.manpages import SystemManDe

    root = tmp_path / "de"
    (root / "man1").mkdir(parents=True)
    (root / "man1" / "real.1.gz").write_bytes(gzip.compress(b".TH R 1\n"))
    (root / "man1" / "alias.1.gz").symlink_to("real.1.gz")
    monkeypatch.setattr(SystemManDe, "root", lambda self: root)
    assert SystemManDe().list_docs(SourceEnv()) == ["man1/real.1.gz"]


DIATHEKE = """\
A Psalm by David, when he fled from Absalom his son.
  Psalms 3:1: Yahweh, how my adversaries have increased!
Many are those who rise up against me.

A Psalm by David, when he fled from Absalom his son.
  Psalms 3:2: Many there are who say of my soul,
“There is no help for him in God.”
Selah.

A Psalm by David, when he fled from Absalom his son.
  Psalms 3:3: But you, Yahweh, are a shield around me.
For the Chief Musician. A Psalm.
  Psalms 4:1: Answer me when I call, God of my righteousness.
For the Chief Musician. A Psalm.
  Psalms 4:2: You sons of men, how long?
Selah.

Job 5:27: Behold, we have researched it.
Hear it, and know it for your good.”
Job 6:1: Then Job answered, <G1234>truly.

(engWEB2015eb)
"""


def test_bible_drops_leaked_headings_and_keeps_poetry_lines():
    chapters = dict(parse_plain(DIATHEKE.split("\n")))
    assert list(chapters) == ["Psalms 3", "Psalms 4", "Job 5", "Job 6"]
    ps3 = chapters["Psalms 3"]
    assert "Absalom" not in ps3 and "Chief Musician" not in ps3  # headings repeated before every verse
    assert ps3.split("\n")[0] == "Yahweh, how my adversaries have increased! Many are those who rise up against me."
    assert "“There is no help for him in God.” Selah." in ps3  # continuation lines stay with their verse
    assert chapters["Psalms 4"].split("\n")[1] == "You sons of men, how long? Selah."
    # a line seen once before a verse (end of a chapter) is a continuation, not a heading
    assert chapters["Job 5"] == "Behold, we have researched it. Hear it, and know it for your good.”"
    assert "engWEB2015eb" not in "".join(chapters.values())
    assert clean_verse_text(chapters["Job 6"]) == "Then Job answered, truly."


MYSQLTEST = """\
--source include/have_innodb.inc
# Test of alter table
let $engine= InnoDB;
eval SET @x = '$engine';
--echo # start
create table t1 (a int, b varchar(10));
insert into t1 values (1, 'x'),
  (2, 'y');
--error ER_DUP_ENTRY
insert into t1 values (1, 'x');
if ($engine == InnoDB) {
  --echo innodb
}
--perl
print "not sql";
EOF
--write_file $MYSQLTEST_VARDIR/tmp/t.sql END_OF_DATA
select 'inside a file';
END_OF_DATA
connect (con1,localhost,root,,);
connection con1;
SELECT IF(a > 1, 'big', 'small') FROM t1;
disconnect con1;
--disable_query_log
DROP TABLE t1;
"""


def test_mysqltest_directives_are_removed():
    sql = clean_mysqltest(MYSQLTEST)
    assert sql.split("\n") == [
        "create table t1 (a int, b varchar(10));",
        "insert into t1 values (1, 'x'),",
        "  (2, 'y');",
        "insert into t1 values (1, 'x');",
        "SELECT IF(a > 1, 'big', 'small') FROM t1;",
        "DROP TABLE t1;",
    ]


SET_MM = """\
$( Comment mentioning $= inside a comment $.  must stay. $)
  ax-mp $a |- ps $.

$(
=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=
        Propositional calculus
=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=
$)
  $( Modus ponens in closed form. $)
  mp2 $p |- ( ph -> ps ) $=
    ( wi ax-mp ) ABCDEFGHIJKLMNOP $.
  id $p |- ( ph -> ph ) $= ( wi ) AAB $.
"""


def test_metamath_proofs_are_removed_and_sections_split():
    text = strip_proofs(SET_MM)
    assert "ABCDEFGHIJKLMNOP" not in text and "AAB" not in text
    assert "mp2 $p |- ( ph -> ps ) $." in text and "id $p |- ( ph -> ph ) $." in text
    assert "$= inside a comment $.  must stay." in text  # comments are kept verbatim
    sections = list(split_sections(text))
    assert [t for t, _ in sections] == ["preamble", "Propositional calculus"]
    assert "mp2" in sections[1][1] and "ax-mp $a" in sections[0][1]
    parts = list(split_sections(text, max_chars=200))
    assert [t for t, _ in parts] == ["preamble", "Propositional calculus", "Propositional calculus #2"]
    assert "".join(p for _, p in parts).replace("\n", "") == text.replace("\n", "")


def test_fortunes_are_split_on_percent_lines_and_grouped():
    assert join_fortunes("one\nline two\n%\nthree\n%\n%\n") == "one\nline two\n\nthree"
    assert list(group_entries(["a" * 10, "b" * 10, "c" * 10], 25)) == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]


def test_fortune_files_become_groups_of_entries(tmp_path):
    from moe_testbed.data.extract import extract_source, read_shard

    root = tmp_path / "usr/share/games/fortunes/de"
    (root / "off").mkdir(parents=True)
    (root / "witze").write_text("\n%\n".join(f"Witz Nummer {i} " + "ha" * 300 for i in range(100)) + "\n%\n")
    (root / "witze.dat").write_bytes(b"\x00\x01index")
    (root / "witze.u8").symlink_to("witze")
    (root / "off" / "derb").write_text("nicht nehmen " * 50)
    env = SourceEnv(packages={"deb:fortunes-de": Resolved(Deb("fortunes-de"), "1", root=tmp_path)})
    meta = extract_source(get_source("fortunes_de"), env, tmp_path / "stage", 10**9)
    docs = list(read_shard(tmp_path / "stage", "fortunes_de"))
    assert meta["documents"] == len(docs) > 2  # 100 entries of ~600 characters: several 16 kB groups
    assert {d["id"].rsplit("#", 1)[0] for d in docs} == {"fortunes-de:/usr/share/games/fortunes/de/witze"}
    assert all("\n%\n" not in d["t"] and len(d["t"]) <= 16_700 for d in docs)
    assert sum(d["t"].count("Witz Nummer") for d in docs) == 100


def test_postgres_psql_guard_is_dropped():
    src = get_source("postgres_sql")
    text = '-- complain\n\\echo Use "CREATE EXTENSION x" to load this file. \\quit\nCREATE TYPE x;'
    assert src.clean(text) == "-- complain\nCREATE TYPE x;"


def test_iso_codes_tables_are_chunked_into_pretty_json(tmp_path):
    root = tmp_path / "usr/share/iso-codes/json"
    root.mkdir(parents=True)
    entries = [{"alpha_2": f"A{i}", "name": f"Land {i}"} for i in range(100)]
    (root / "iso_3166-1.json").write_text(json.dumps({"3166-1": entries}))
    env = SourceEnv(packages={"deb:iso-codes": Resolved(Deb("iso-codes"), "1", root=tmp_path)})
    docs = list(get_source("iso_codes_json").iter_docs(env))
    assert len(docs) == 3  # 40 + 40 + 20 entries
    assert json.loads(docs[2].text) == {"3166-1": entries[80:]}
    assert docs[0].text.startswith('{\n  "3166-1": [\n    {')


def test_normalize_and_truncate():
    assert normalize("a  \r\nb\x00\x1b[1m\n\n\n\n\n\nc\n\n") == "a\nb[1m\n\n\nc"
    assert truncate_lines("line1\nline2\nline3", 13) == "line1\nline2"
    assert truncate_lines("short", 100) == "short"


def test_decode_replaces_or_refuses_bad_bytes():
    text, bad = decode(b"caf\xe9 ok \xef\xbf\xbd", "replace", "f.txt")
    assert bad == 1 and text.startswith("caf\ufffd")
    with pytest.raises(DataError, match="f.txt is not valid UTF-8"):
        decode(b"caf\xe9", "strict", "f.txt")


def test_python_stdlib_excludes_tests_and_site_packages():
    ids = get_source("python_stdlib").list_docs(SourceEnv())
    assert "json/encoder.py" in ids
    assert not [i for i in ids if i.startswith(("test/", "site-packages/", "encodings/")) or "/tests/" in i]


def test_every_source_declares_domain_licence_and_packages():
    from moe_testbed.data.packages import Npm, PyPI
    from moe_testbed.data.sources import SOURCES

    for name, cls in SOURCES.items():
        assert cls.name == name and cls.domain and cls.licence, name
        for req in cls.packages:
            if isinstance(req, (PyPI, Npm)):
                assert len(req.sha256) == 64 and req.version, name
    assert Path(__file__).exists()
