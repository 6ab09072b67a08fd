"""The preamble of a fresh interpreter in which any import of `hf_lowrank` fails: what remote-code users have.

Test scripts that run with ``python -c`` start with ``BLOCK_HF_LOWRANK`` and then use plain transformers/PEFT."""

BLOCK_HF_LOWRANK = r"""
import sys
class BlockHfLowrank:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_lowrank" or name.startswith("hf_lowrank."):
            raise ImportError("hf_lowrank is blocked in this process")
sys.meta_path.insert(0, BlockHfLowrank())
"""


def run_without_package(script: str, *args, cwd, timeout: int = 300, env: dict | None = None) -> dict:
    """Run ``script`` (which starts with ``BLOCK_HF_LOWRANK``) in a fresh interpreter with ``args``; it must exit 0
    and print a JSON object as its last line, which is returned."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
