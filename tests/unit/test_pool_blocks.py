"""What a new pool must answer after a lost node (`ray_data._keep_answered`): whole blocks
only, so no row is lost or answered twice. The two-node test loses a real node."""

import pandas as pd

from pocl_ray.ray_data import _keep_answered


def block(ids: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ids, "x": [i * 10 for i in ids]})


def test_answered_blocks_are_kept_and_the_rest_redone_whole():
    blocks = [block([1, 2]), block([3, 4]), block([5, 6]), block([7])]
    done = [pd.DataFrame({"sample_id": [3, 4], "nll": [0.3, 0.4]}),
            pd.DataFrame({"sample_id": [7], "nll": [0.7]}),
            pd.DataFrame({"sample_id": [5], "nll": [0.5]})]  # fmt: skip (half a block)
    kept, left = _keep_answered(done, blocks, ["sample_id"])
    assert sorted(pd.concat(kept)["sample_id"]) == [3, 4, 7]  # 5 is dropped: its block redoes
    assert [list(b["sample_id"]) for b in left] == [[1, 2], [5, 6]]
    assert _keep_answered([], blocks, ["sample_id"]) == ([], blocks)


def test_rows_are_named_by_several_key_columns():
    rows = pd.DataFrame({"set": ["a", "a", "b"], "index": [0, 1, 0], "seed": [10, 10, 10]})
    blocks = [rows.iloc[:2], rows.iloc[2:]]
    answers = pd.DataFrame({"model": ["m1", "m2"], "set": ["b", "b"], "index": [0, 0],
                            "seed": [10, 10]})  # fmt: skip
    kept, left = _keep_answered([answers], blocks, ["set", "index", "seed"])
    assert len(kept[0]) == 2 and len(left) == 1 and left[0].equals(blocks[0])
