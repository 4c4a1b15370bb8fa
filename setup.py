"""Package discovery for setuptools; every other piece of metadata is in pyproject.toml.

Packages are discovered, never listed: every package under ``mechlib/`` is found by
``find_packages``, and the repository's top-level ``data/`` folder ships as the package
``mechlib.data``. Every file in those folders goes into the wheel and the sdist
(``tests/test_install.py`` builds both and compares them with the tree).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mechlib", "mechlib.*"]) + ["mechlib.data"],
    package_dir={"mechlib.data": "data"},
    package_data={"": ["*"]},
    exclude_package_data={"": ["*.pyc", "*.pyo", ".*"]},
)
