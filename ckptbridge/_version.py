"""The version of ckptbridge, in a leaf module of its own.

Archive metadata records it (``formats/meta.py``) and the package root re-exports
it: a module low in the stack reads it from here rather than importing the
package root above it.  ``pyproject.toml`` reads it from here too (setuptools'
``attr:``), so it is written in one place.
"""

__version__ = "0.1.0"
