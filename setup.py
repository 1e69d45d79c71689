"""Package layout: `dora` and `dora_kernels` (hot kernels, with their C++ sources as package data).
The kernels folder is named after its package: a top-level `kernels/` folder would shadow the
unrelated `kernels` distribution (which transformers imports) wherever the checkout is on sys.path."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dora", "dora.*", "dora_kernels", "dora_kernels.*"]),
    package_data={"dora_kernels": ["cpu/*.cpp"]},
)
