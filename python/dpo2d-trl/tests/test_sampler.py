"""dpo2d's data order: SplitMix64, per-epoch permutations, the held-out split."""

from dpo2d_trl.sampler import Dpo2dSampler, SplitMix, epoch_order, round_half_away, split_held_out


def test_splitmix64_reference_values():
    # The published SplitMix64 sequence for seed 0.
    s = SplitMix(0)
    assert [s.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_epoch_orders_are_seeded_permutations():
    a, b, c = epoch_order(10, 42, 0), epoch_order(10, 42, 0), epoch_order(10, 42, 1)
    assert a == b and a != c and sorted(a) == list(range(10))


def test_sampler_follows_the_epoch_and_strategy():
    s = Dpo2dSampler(7, 3, "random")
    assert list(s) == epoch_order(7, 3, 0)
    s.set_epoch(2)
    assert list(s) == epoch_order(7, 3, 2)
    assert list(Dpo2dSampler(5, 3, "sequential")) == [0, 1, 2, 3, 4]


def test_held_out_split_is_seeded_and_keeps_file_order():
    train, held = split_held_out(list(range(10)), 0.2, 3)
    assert (len(train), len(held)) == (8, 2)
    assert train == sorted(train) and held == sorted(held)
    assert split_held_out(list(range(10)), 0.2, 3)[1] == held
    # round() as Rust's: 2.5 -> 3 (Python's round gives 2).
    assert round_half_away(2.5) == 3 and len(split_held_out(list(range(25)), 0.1, 1)[1]) == 3
