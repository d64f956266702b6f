"""Property tests: any state tree round-trips exactly through HDF5, and its checksum is stable and sensitive."""

import h5py
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_hpc.hdf5_tree import Digest, read_tree, tree_digest, write_tree

TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8,
                torch.bool, torch.int32]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-100, 100, shape, generator=g) if not dtype.is_floating_point else torch.randn(shape, generator=g)
    return t.to(dtype)


keys = st.one_of(st.text(min_size=0, max_size=6), st.integers(-5, 5))
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=False), st.text(max_size=8),
    st.binary(max_size=8), tensors(),
    st.builds(lambda xs: np.array(xs, dtype=np.float32), st.lists(st.floats(-1e6, 1e6, width=32), max_size=4)),
    st.lists(st.integers(-(2**62), 2**62), max_size=4), st.lists(st.text(max_size=4), max_size=3),
)
trees = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=3), st.tuples(children, children), st.dictionaries(keys, children, max_size=3)),
    max_leaves=12)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=40, deadline=None, database=None)
@given(st.dictionaries(keys, trees, max_size=4))
def test_any_tree_round_trips_and_checksum_matches(tree):
    with h5py.File("mem.h5", "w", driver="core", backing_store=False, track_order=True) as f:
        digest = Digest()
        g = f.create_group("state", track_order=True)
        write_tree(g, tree, digest, "/state")
        digest.add("/state", g, [])
        digest.add("/", f, [])
        assert digest.hexdigest() == tree_digest(f)  # computed while writing == recomputed from the file
        back = read_tree(f["state"])
        assert same(tree, back), (tree, back)
        if tree:  # any change of content changes the checksum
            before = tree_digest(f)
            leaves = []
            f["state"].visititems(lambda name, obj: leaves.append(obj) if isinstance(obj, h5py.Dataset)
                                  and obj.shape and obj.size and obj.dtype.kind in "fiub" else None)
            if leaves:  # one byte of stored data
                raw = leaves[0][...]
                flipped = raw.copy().view(np.uint8)
                flipped.reshape(-1)[0] ^= 1
                leaves[0][...] = flipped.view(raw.dtype).reshape(raw.shape)
                assert tree_digest(f) != before
                leaves[0][...] = raw
            g.attrs["extra"] = 1
            assert tree_digest(f) != before


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.integers(0, 40), max_size=6), st.sampled_from([8, 16, 64]), st.sampled_from([16, 1 << 20]))
def test_streamed_digest_equals_digest_of_the_file(piece_rows, block_bytes, small_bytes):
    """A dataset hashed piece by piece while it is written (Digest.stream, what the replay buffer's save uses)
    gets the digest recomputed from the file, wherever the pieces and the hash blocks cut the bytes, and
    whether its last block is hashed by a worker or on the calling thread."""
    from mtrl_hpc import hdf5_tree

    old = hdf5_tree.BLOCK_BYTES, hdf5_tree.SMALL_BYTES
    hdf5_tree.BLOCK_BYTES = block_bytes  # a few rows per block, so pieces straddle blocks (or end on an edge)
    hdf5_tree.SMALL_BYTES = small_bytes
    try:
        rng = np.random.default_rng(sum(piece_rows))
        rows = rng.standard_normal((sum(piece_rows), 2)).astype(np.float32)  # 8 bytes per row
        with h5py.File("mem.h5", "w", driver="core", backing_store=False, track_order=True) as f:
            digest = Digest()
            ds = f.create_dataset("x", shape=rows.shape, dtype=rows.dtype)
            stream = digest.stream("/x", ds)
            off = 0
            for n in piece_rows:
                ds[off:off + n] = rows[off:off + n]
                stream.update(rows[off:off + n].copy())
                off += n
            stream.close()
            digest.add("/", f, [])
            assert digest.hexdigest() == tree_digest(f)
    finally:
        hdf5_tree.BLOCK_BYTES, hdf5_tree.SMALL_BYTES = old
