"""Installs `sm3_tf`: `pip install .` (core), `pip install .[test]`, `.[trainers]`."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "sm3_tf" / "__init__.py").read_text()
).group(1)

# The CPU build of TensorFlow: the GPU wheel is gigabytes, and the optimizer
# does not need it. Users with a GPU install `tensorflow` themselves first;
# pip then sees `tensorflow-cpu`'s requirement unmet only if they choose so,
# hence the extra `gpu` that swaps the dependency.
CORE = ["keras==3.15.1", "numpy>=1.26"]
TF_CPU = ["tensorflow-cpu==2.21.0"]
TF_GPU = ["tensorflow==2.21.0"]
# torch and jax (CPU builds, which install from local files here) run the
# backend-neutrality test, tests/sm3_backends_test.py, on Keras's other backends.
TEST = ["pytest==9.2.0", "hypothesis==6.170.17", "torch==2.13.0",
        "jax==0.10.2", "jaxlib==0.10.2"]
EXAMPLES = ["scikit-learn==1.9.1"]
TRAINERS = [
    "absl-py==2.5.1",
    "tensorflow-datasets==4.9.10",
    "importlib-resources==7.1.0",
    "tensorboard==2.21.0",
    "scikit-learn==1.9.1",
    "sentencepiece==0.2.3",
    "sacrebleu==2.6.0",
]
SCRIPTS = ["matplotlib==3.11.2"]

setup(
    name="sm3_tf",
    version=VERSION,
    description=(
        "SM3, the memory-efficient adaptive optimizer (Anil et al., NeurIPS "
        "2019), as a Keras 3 optimizer for TensorFlow, with XLA and sparse "
        "(embedding) support."
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sm3_tf", "sm3_tf.*"]),
    # The CPU kernel's source, built at first use (sm3_tf/cpu_kernel.py).
    package_data={"sm3_tf": ["native/*.h", "native/*.cc"]},
    python_requires=">=3.10",
    install_requires=CORE + TF_CPU,
    extras_require={
        # The trainer tests (tests/trainers_*_test.py) import the trainers'
        # dependencies, so the CI's `.[test]` installs them too.
        "test": TEST + EXAMPLES + [p for p in TRAINERS if p not in EXAMPLES],
        "examples": EXAMPLES,
        "trainers": TRAINERS,
        "scripts": TRAINERS + SCRIPTS,
        "gpu": TF_GPU,
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
