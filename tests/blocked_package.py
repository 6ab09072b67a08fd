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
