"""FlexNPU: transparent user-space virtualization for AI accelerators.

The C core of the shared-memory ring (flexnpu/ring/) is compiled by cffi in API
mode at install time; everything else is pure Python.
"""
from setuptools import find_packages, setup

setup(
    name="flexnpu",
    version="0.1.0",
    description="Transparent user-space accelerator virtualization with phase-aware LLM scheduling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The benchmarks keep their top-level bench/ folder but install inside the flexnpu package:
    # never as a site-wide package named "bench".
    packages=find_packages(include=["flexnpu", "flexnpu.*"]) + ["flexnpu.bench"],
    package_dir={"flexnpu.bench": "bench"},
    package_data={"flexnpu.ring": ["*.c", "*.h"],
                  "flexnpu.hook": ["bootstrap/*.py", "bootstrap/*/*.py"]},
    data_files=[("share/flexnpu/systemd", ["systemd/flexnpu@.service", "systemd/flexnpu.target"])],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["flexnpu/ring/_build.py:ffibuilder"],
    install_requires=["cffi>=1.15", "numpy>=1.24", "posix_ipc>=1.1", "psutil>=5.9"],
    extras_require={
        # torch is deliberately not a hard requirement: an unconstrained "torch" would pull
        # a multi-GB CUDA build. Install the CPU build first: pip install torch==2.13.0
        "torch": ["torch>=2.6"],
        "npu": ["torch_npu"],
        "serve": ["transformers>=4.40", "matplotlib>=3.7"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "pytest-timeout>=2", "pyzmq>=25",
                 "ruff>=0.6", "mypy>=1.10"],
    },
    entry_points={"console_scripts": ["flexnpu=flexnpu.cli:main"]},
    zip_safe=False,
)
