"""Package layout: `dora` plus the top-level `kernels/` folder installed as `dora_kernels`
(so it cannot shadow the unrelated `kernels` distribution)."""
from setuptools import find_packages, setup

kernel_packages = ["dora_kernels" + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["dora", "dora.*"]) + kernel_packages,
    package_dir={"dora_kernels": "kernels"},
    package_data={"dora_kernels": ["cpu/*.cpp"]},
)
