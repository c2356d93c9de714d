"""The universal checkpoint format (docs/FORMAT.md): manifest dataclasses and the state codec.
No torch.distributed and no framework here.

Vocabulary, fixed here for the whole package (docs, code and errors use these words in this sense):

- **atom**: one parameter's full consolidated state under its *global* name (as a single-rank model
  names it): the fp32 master (``fp32``), every optimizer state (``exp_avg``, ...), scalar states
  (``step``). Frozen parameters and buffers are atoms with the one state ``param``. (``Atom``)
- **state**: one tensor of an atom (``fp32``, ``exp_avg``, ``param``, ...), all of the atom's shape.
- **layout**: the parallel degrees of a job (TP, PP, DP, EP, ETP, SP), its ZeRO stage and dtypes.
  (``Layout``; ``plan.zero.ZeroLayout`` is the ZeRO buffer geometry *of* a layout.)
- **split**: how a parameter is divided over the TP (or, for experts, ETP) ranks: replicated,
  partitioned, vocab-partitioned, fused, blocks; the checkpoint language (``ucp_plugin.language``).
  A family's *spec* maps parameter names to splits; a *placement* turns a rank-local layer or expert
  index into the global one.
- **region**: the part of an atom one TP rank holds, its *local tensor*: along one dim the global
  intervals concatenated, then padding rows that are not part of the atom. (``Region``)
- **fragment**: a contiguous range ``[start, stop)`` of a local tensor's row-major elements, what a
  rank holds in memory (a ZeRO partition, a distributed-optimizer shard, a DP rank's share).
- **piece**: a fragment as stored: one state's range of a region's local tensor, 1-D in a file.
  (``Piece``) Pieces are what a checkpoint holds; a reader plans target fragments from them.
- **segment**: the part of a local tensor made of several atoms (a ``Blocks`` split, megatron's
  GroupedMLP) that is one atom's region (``plan.segments``).
"""
from .index import DIGEST_BYTES, DIGESTS, ShardIndex
from .manifest import (ATOM_KINDS, FORMAT_VERSION, INDEX, MANIFEST, WEIGHT_STATE, Atom, FileEntry, Layout, Manifest,
                       Piece, Region, Writer, check_version, dtype_name, is_scalar, scalar_value)

__all__ = ["ATOM_KINDS", "DIGESTS", "DIGEST_BYTES", "INDEX", "ShardIndex", "FORMAT_VERSION", "MANIFEST", "Atom", "FileEntry", "Layout", "Manifest", "Piece",
           "Region", "Writer", "check_version", "dtype_name", "is_scalar", "WEIGHT_STATE", "scalar_value"]
