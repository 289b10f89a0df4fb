"""The package version, alone in a module without imports.

``sparsed_backend/__init__.py`` re-exports it; ``sparsed --version`` (`sparsed_cli`) reads this
file's text when no package metadata exists (a source checkout run with ``PYTHONPATH=src``),
because importing ``sparsed_backend`` would load torch and transformers. Keep it one literal
assignment: that reader parses it, it does not run it. pyproject.toml's ``version`` must agree
(a test checks).
"""

__version__ = "0.1.0"
