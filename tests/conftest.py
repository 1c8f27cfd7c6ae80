"""Every test sees 8 fake CPU devices, so the sharded code paths run for real, and a home directory of its
own, so that the caches a run keeps under ~/.cache/spcl_jax (compiled programs, image-folder listings) are
the suite's, shared by the tests and the launch.py processes they start."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HOME"] = os.path.join(tempfile.gettempdir(), "spcl_jax_test_home")
# In-process tests compile the same small programs as the launch.py runs: the same cache as configs/default.py's.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["HOME"], ".cache", "spcl_jax", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from spcl_jax import runtime  # noqa: E402  (after the environment it reads)

runtime.configure()
