import torch

from mtlrec.data.table import TensorTable


def _table(n=103):
    return TensorTable(
        cat=torch.arange(n).unsqueeze(1),
        seq=torch.zeros(n, 0, dtype=torch.long),
        num=torch.arange(n, dtype=torch.float32).unsqueeze(1),
        labels=torch.zeros(n, 2),
    )


def test_batches_visit_every_row_once_in_order():
    table = _table()
    seen = torch.cat([b.cat[:, 0] for b in table.batches(10)])
    assert seen.tolist() == list(range(103))
    assert table.num_batches(10) == 11


def test_shuffle_is_a_permutation_repeatable_by_seed():
    table = _table()
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        runs.append(torch.cat([b.cat[:, 0] for b in table.batches(16, shuffle=True, generator=g)]))
    assert torch.equal(runs[0], runs[1])
    assert sorted(runs[0].tolist()) == list(range(103))
    assert runs[0].tolist() != list(range(103))
    # columns stay aligned after the shuffle
    batch = next(table.batches(16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(batch.cat[:, 0].float(), batch.num[:, 0])


def test_drop_last_and_slices_are_views():
    table = _table()
    sizes = [len(b) for b in table.batches(25, drop_last=True)]
    assert sizes == [25, 25, 25, 25]
    part = table.slice(0, 5)
    assert part.cat.data_ptr() == table.cat.data_ptr()
