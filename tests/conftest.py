import os
import sys
import tempfile

# Tests see 8 CPU devices (sharding tests need them); set before JAX initialises its backends. The
# tests' models are tiny: compiling is most of their time, and LLVM's optimisation level 0 cuts it by
# a third. Every process a test starts gets the same level (helpers.FAST_COMPILE), so figures that
# two processes compare are computed alike.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, shared by the xdist workers and by every program
# the tests start: the same tiny models compile once, not once per process.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"tj-jax-cache-{_run}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 512-piece SentencePiece model of the embedded corpus, trained once for the whole run."""
    from transformer_jax.data import corpus
    from transformer_jax.data.tokenizer import train_sentencepiece

    docs = corpus.embedded_corpus()
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_sentencepiece([docs[i] for i in range(0, 600, 10)], 512, str(prefix))
    return str(prefix) + ".model"


# The longest files first: with --dist loadfile the two workers then end together, instead of one
# running test_pods alone for the last minutes (files keep their own order; the rest stay alphabetical).
LONGEST_FIRST = (
    "test_pods.py",
    "test_itm.py",
    "test_docs.py",
    "test_translate.py",
    "test_sweep.py",
    "test_continued.py",
    "test_distributed.py",
    "test_multihost_eval.py",
    "test_finetune.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
