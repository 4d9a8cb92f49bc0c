"""`import specscope` (and its probe, optim, integrations packages) never imports transformers or lightning."""

import subprocess
import sys


def test_core_imports_no_framework():
    code = ("import sys, specscope, specscope.probe, specscope.optim, specscope.integrations, specscope.cli.commands; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
