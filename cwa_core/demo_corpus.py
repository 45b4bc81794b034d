"""The demo corpus: docstrings of a fixed list of standard-library modules.

This file imports only the standard library and nothing of this package: :func:`build_demo_corpus`
runs it as a script in a fresh interpreter (``python -I -S``) and calls :func:`_collect_corpus`.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

logger = logging.getLogger(__name__)

# Standard-library modules whose docstrings make the corpus. Fixed and sorted, so the text
# depends only on the Python version. Left out on purpose: modules with import side effects
# (antigravity, this, tkinter, turtle, idlelib, test.*, readline), and modules deprecated
# with a warning on import. A module that does not import here (platform-only) is skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        _collections_abc _compression _markupbase _pydecimal _pyio _sitebuiltins _strptime
        _threading_local _weakrefset abc argparse array ast asyncio asyncio.base_events
        asyncio.base_futures asyncio.base_subprocess asyncio.base_tasks asyncio.coroutines
        asyncio.events asyncio.exceptions asyncio.format_helpers asyncio.futures asyncio.locks
        asyncio.mixins asyncio.proactor_events asyncio.protocols asyncio.queues asyncio.runners
        asyncio.selector_events asyncio.sslproto asyncio.staggered asyncio.streams
        asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.threads asyncio.timeouts
        asyncio.transports asyncio.trsock asyncio.unix_events atexit base64 bdb binascii bisect
        builtins bz2 cProfile calendar cmath cmd code codecs codeop collections collections.abc
        colorsys compileall concurrent.futures concurrent.futures._base concurrent.futures.process
        concurrent.futures.thread configparser contextlib contextvars copy copyreg csv ctypes
        ctypes.util curses curses.ascii curses.panel curses.textpad dataclasses datetime dbm
        dbm.dumb decimal difflib dis doctest email email._encoded_words email._header_value_parser
        email._parseaddr email._policybase email.base64mime email.charset email.contentmanager
        email.encoders email.errors email.feedparser email.generator email.header
        email.headerregistry email.iterators email.message email.mime.application
        email.mime.audio email.mime.base email.mime.image email.mime.message email.mime.multipart
        email.mime.nonmultipart email.mime.text email.parser email.policy email.quoprimime
        email.utils encodings encodings.idna encodings.punycode enum errno faulthandler fcntl
        filecmp fileinput fnmatch fractions ftplib functools gc genericpath getopt getpass gettext
        glob graphlib grp gzip hashlib heapq hmac html html.entities html.parser http http.client
        http.cookiejar http.cookies http.server imaplib importlib importlib._abc
        importlib._bootstrap importlib._bootstrap_external importlib.abc importlib.machinery
        importlib.metadata importlib.readers importlib.resources importlib.resources.abc
        importlib.resources.readers importlib.resources.simple importlib.simple importlib.util
        inspect io ipaddress itertools json json.decoder json.encoder json.scanner keyword
        linecache locale logging logging.config logging.handlers lzma mailbox marshal math
        mimetypes mmap modulefinder multiprocessing multiprocessing.connection
        multiprocessing.context multiprocessing.dummy multiprocessing.forkserver
        multiprocessing.heap multiprocessing.managers multiprocessing.pool
        multiprocessing.process multiprocessing.queues multiprocessing.reduction
        multiprocessing.resource_sharer multiprocessing.resource_tracker
        multiprocessing.shared_memory multiprocessing.sharedctypes multiprocessing.spawn
        multiprocessing.synchronize multiprocessing.util netrc ntpath nturl2path numbers opcode
        operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posix
        posixpath pprint profile pstats pty pwd py_compile pyclbr pydoc pyexpat queue quopri random
        re reprlib resource rlcompleter runpy sched secrets select selectors shelve shlex shutil
        signal smtplib socket socketserver sqlite3 sqlite3.dbapi2 sqlite3.dump ssl stat statistics
        string stringprep struct subprocess symtable sys sysconfig syslog tabnanny tarfile
        tempfile termios textwrap threading time timeit token tokenize tomllib tomllib._parser
        trace traceback tracemalloc tty types typing unicodedata unittest unittest.async_case
        unittest.case unittest.loader unittest.main unittest.mock unittest.result unittest.runner
        unittest.signals unittest.suite unittest.util urllib.error urllib.parse urllib.request
        urllib.response urllib.robotparser uuid venv warnings wave weakref webbrowser
        wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate
        xml.dom xml.dom.NodeFilter xml.dom.domreg xml.dom.expatbuilder xml.dom.minicompat
        xml.dom.minidom xml.dom.pulldom xml.dom.xmlbuilder xml.etree.ElementInclude
        xml.etree.ElementPath xml.etree.ElementTree xml.parsers.expat xml.sax xml.sax._exceptions
        xml.sax.expatreader xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport zlib zoneinfo zoneinfo._common zoneinfo._tzpath
        zoneinfo._zoneinfo
        """.split()
    )
)




def _doc(obj: object) -> str | None:
    """The object's own docstring, cleaned, or None."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    return doc or None


def _from_stdlib(obj: object) -> bool:
    """False for objects defined by third-party code (e.g. methods patched onto stdlib classes)."""
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.partition(".")[0] in sys.stdlib_module_names


def _module_docs(module: ModuleType) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, and their methods (sorted by name)."""
    if doc := _doc(module):
        yield doc
    namespace = vars(module)
    for name in sorted(namespace):
        if name.startswith("__"):
            continue
        obj = namespace[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _from_stdlib(obj):
            continue
        if doc := _doc(obj):
            yield doc
        if inspect.isclass(obj):
            members = vars(obj)
            for member_name in sorted(members):
                member = members[member_name]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                routine = inspect.isroutine(member) and _from_stdlib(member)
                if routine or isinstance(member, property):
                    if doc := _doc(member):
                        yield doc


def _collect_corpus() -> str:
    """The corpus, collected in this process (see :func:`build_demo_corpus`)."""
    seen: set[str] = set()
    documents: list[str] = []
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in STDLIB_MODULES:
            try:
                module = importlib.import_module(module_name)
                docs = list(_module_docs(module))
            except Exception:  # platform-only or missing optional C module
                skipped.append(module_name)
                continue
            for doc in docs:
                # Odd code points (lone surrogates) cannot be written as UTF-8.
                doc = doc.encode("utf-8", "replace").decode("utf-8")
                if doc not in seen:
                    seen.add(doc)
                    documents.append(doc)
    if skipped:
        logger.debug("corpus: skipped modules that did not import: %s", ", ".join(skipped))
    return "\n\n".join(documents)


_CLEAN_RUNNER = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_cwa_demo_corpus", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
sys.stdout.buffer.write(module._collect_corpus().encode("utf-8"))
"""


def build_demo_corpus() -> str:
    """Docstrings of :data:`STDLIB_MODULES`, deduplicated, one document per docstring.

    Documents are separated by a blank line; about 1.5 MB on CPython 3.11 for Linux. The
    docstrings are read in a fresh interpreter (``python -I -S``), so the text depends only
    on the Python version and platform, not on what this process imported or patched
    (third-party packages do patch stdlib classes), and this process imports nothing.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CLEAN_RUNNER, str(Path(__file__).resolve())],
            capture_output=True,
            check=True,
            timeout=600,
        )
        return result.stdout.decode("utf-8")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        logger.warning(
            "no clean interpreter for the demo corpus (%s); reading docstrings in this process, "
            "where imported packages may change a few of them",
            exc,
        )
        return _collect_corpus()
