"""Secure aggregation's pieces (issue 25): the field encoding, the masks, the server's protocol and
the client's stages, driven together without a model or a Grid.

Each round here is the real protocol: the server's :class:`~fedlora.server.secagg.Protocol` and
each node's stage functions of :mod:`fedlora.client.secagg` exchange the very records they would
exchange over Flower (replies are Messages, records ConfigRecords); only local training is left
out, its update given as a vector.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from scipy import stats

from fedlora.client import secagg as C
from fedlora.config import RunConfig, SecureAggregationConfig
from fedlora.errors import ConfigError
from fedlora.server.secagg import Protocol, RoundSkipped, SecAggError, ring
from fedlora.strategies import get_strategy_class
from fedlora.strategies.registry import STRATEGIES
from fedlora.wire import protocol as P
from fedlora.wire import secagg as S

pytestmark = pytest.mark.unit

SERVED = ("fedavg", "ffa", "fedsa", "federa", "dpdylora")
REFUSED = ("hetlora", "fltac", "flora", "fedex")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Message() stamps its sender from TaskIdentity, which a runtime sets: set it here."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def request(node: int, entries: dict) -> Message:
    content = RecordDict({S.RECORD: ConfigRecord(entries)})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def reply(to: Message, entries: dict, vector: np.ndarray | None = None) -> Message:
    record = to.content.config_records[S.RECORD]
    content = RecordDict({S.RECORD: ConfigRecord({**entries, S.STAGE: record[S.STAGE], S.SESSION: record[S.SESSION]})})
    if vector is not None:
        content[P.ARRAYS] = ArrayRecord({S.MASKED: Array(vector)})
    return Message(content=content, reply_to=to)


class Round:
    """One round of the protocol among ``n`` nodes, each with an update, a count and a loss."""

    def __init__(self, n: int = 5, size: int = 300, seed: int = 0, **settings) -> None:
        rng = np.random.default_rng(seed)
        self.nodes = [101 + 7 * i for i in range(n)]
        self.deltas = {k: rng.normal(0, 0.02, size) for k in self.nodes}
        self.counts = {k: int(rng.integers(5, 200)) for k in self.nodes}
        self.losses = {k: float(rng.uniform(0.5, 2.0)) for k in self.nodes}
        self.settings = SecureAggregationConfig(mode="secagg+", **settings)
        self.proto = Protocol(1, self.nodes, self.settings, size + S.EXTRAS, seed=seed)
        self.secrets: dict[int, C.Secrets] = {}
        self.encoded: dict[int, np.ndarray] = {}

    def keys(self, nodes=None) -> None:
        for node in nodes or self.nodes:
            ask = request(node, self.proto.advertise())
            self.secrets[node], entries = C.advertise(ask.content[S.RECORD], node)
            self.proto.take_keys(node, reply(ask, entries))

    def share(self, nodes=None) -> None:
        for node in nodes or sorted(self.proto.pk1):
            ask = request(node, self.proto.share_keys(node))
            self.proto.take_shares(node, reply(ask, C.share_keys(self.secrets[node], ask.content[S.RECORD])))

    def masked_reply(self, node: int) -> Message:
        ask = request(node, self.proto.masked_input(node))
        partners = C.receive_shares(self.secrets[node], ask.content[S.RECORD])
        args = (self.deltas[node], self.counts[node], self.losses[node])
        self.encoded[node] = S.encode_input(*args, self.proto.field, np.random.default_rng(node))
        vector = C.masked_vector(self.secrets[node], partners, *args, np.random.default_rng(node))
        return reply(ask, {}, vector)

    def mask(self, nodes=None, lost=()) -> None:
        """Every sharer masks; the masked inputs of ``lost`` never arrive."""
        for node in nodes or sorted(self.proto.digests):
            message = self.masked_reply(node)
            if node not in lost:
                self.proto.take_masked(node, message)
        self.proto.after_masking()

    def unmask(self, silent=()) -> None:
        for node in sorted(self.proto.masked):
            ask = request(node, self.proto.unmask(node))
            entries = C.unmask(self.secrets[node], ask.content[S.RECORD])
            if node not in silent:
                self.proto.take_unmask(node, reply(ask, entries))

    def run(self, lost=(), silent=()) -> S.DecodedSum:
        self.keys()
        self.share()
        self.mask(lost=lost)
        self.unmask(silent=silent)
        return self.proto.result()

    def weighted_mean(self, nodes) -> np.ndarray:
        """The plain weighted mean of ``nodes``' updates, weighted as the field weighs them."""
        weights = np.array([S.quantize_weight(self.counts[k], self.proto.field) for k in nodes], dtype=np.float64)
        return sum(w * self.deltas[k] for w, k in zip(weights, nodes)) / weights.sum()


# -- the field -------------------------------------------------------------------------------------


def test_encoding_decodes_the_weighted_mean_within_the_bound():
    field = S.FieldSpec(clipping_range=0.5, quantization_bits=16, modulus_bits=32, max_weight=100.0)
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 0.05, 1000) for _ in range(4)]
    counts, losses = [10, 40, 100, 5000], [1.0, 2.0, 0.5, 1.5]  # the last is capped at max_weight
    total = S.sum_vectors([S.encode_input(d, n, x, field, rng) for d, n, x in zip(deltas, counts, losses)], field)
    got = S.decode_sum(total, 4, field)
    weights = np.array([S.quantize_weight(n, field) for n in counts], dtype=np.float64) / field.target
    assert weights[-1] == 1.0  # 5000 examples weigh what max_weight does
    exact = sum(w * d for w, d in zip(weights, deltas)) / weights.sum()
    assert np.abs(got.mean_update - exact).max() <= S.error_bound(4, got.total_weight, field)
    assert got.total_weight == pytest.approx(weights.sum())
    assert got.loss == pytest.approx(float(np.dot(weights, losses) / weights.sum()), abs=1e-3)
    assert got.clipped_fraction == 0.0


def test_coordinates_beyond_the_range_are_clipped_and_counted():
    field = S.FieldSpec(clipping_range=0.01, quantization_bits=20, modulus_bits=32, max_weight=10.0)
    delta = np.array([0.5, -0.5, 0.001, 0.0])
    got = S.decode_sum(S.encode_input(delta, 10, 1.0, field, np.random.default_rng(0)), 1, field)
    assert got.mean_update[:2] == pytest.approx([0.01, -0.01], abs=1e-6)
    assert got.clipped_fraction == pytest.approx(0.5, abs=1e-5)


def test_masked_vectors_are_uniform_and_independent_of_the_input():
    """Chi-square over the field's values and correlation with the input, over many sessions."""
    field = S.FieldSpec(clipping_range=1.0, quantization_bits=8, modulus_bits=12, max_weight=10.0)
    rng = np.random.default_rng(2)
    extremes = {"zeros": np.full(2000, -1.0), "ones": np.full(2000, 1.0), "random": rng.uniform(-1, 1, 2000)}
    for name, delta in extremes.items():
        encoded = S.encode_input(delta, 10, 1.0, field, rng)
        draws = np.stack(
            [S.mask_input(encoded, rng.bytes(32), {7: rng.bytes(32)}, 3, f"s{i}", field) for i in range(50)]
        ).astype(np.int64)
        counts = np.bincount(draws.ravel() * 32 // field.modulus, minlength=32)
        assert stats.chisquare(counts).pvalue > 1e-4, name
        # one coordinate across sessions is uniform too (the masks are fresh each round)
        assert stats.chisquare(np.bincount(draws[:, 0] * 4 // field.modulus, minlength=4)).pvalue > 1e-4, name
        if name == "random":
            assert abs(np.corrcoef(encoded.astype(np.float64), draws[0])[0, 1]) < 0.1


def test_ring_neighbourhoods_are_symmetric_and_sized():
    nodes = list(range(10, 21))
    hoods = ring(nodes, 5, seed=3)
    assert all(len(h) == 5 and n in h for n, h in hoods.items())
    assert all(n in hoods[m] for n, h in hoods.items() for m in h)
    assert ring(nodes, 11, seed=3) == {n: nodes for n in nodes}


# -- the protocol: exact sums, dropouts, the threshold ---------------------------------------------


@pytest.mark.parametrize("shares", [None, 5])
def test_sum_equals_the_plain_weighted_mean(shares):
    r = Round(n=7, num_shares=shares)
    got = r.run()
    assert np.array_equal(r.proto.total(), S.sum_vectors(list(r.encoded.values()), r.proto.field))
    bound = S.error_bound(7, got.total_weight, r.proto.field)
    assert np.abs(got.mean_update - r.weighted_mean(r.nodes)).max() <= bound


@pytest.mark.parametrize("lost", [1, 2])  # one, and n - threshold (5 nodes, threshold 3)
def test_dropout_after_sharing_keys_recovers_the_survivors_exact_sum(lost):
    r = Round(n=5)
    gone = r.nodes[:lost]
    got = r.run(lost=gone)
    survivors = [n for n in r.nodes if n not in gone]
    assert sorted(r.proto.masked) == survivors and r.proto.dead == gone
    assert np.array_equal(r.proto.total(), S.sum_vectors([r.encoded[n] for n in survivors], r.proto.field))
    assert np.abs(got.mean_update - r.weighted_mean(survivors)).max() <= S.error_bound(
        5 - lost, got.total_weight, r.proto.field
    )


@pytest.mark.parametrize("silent", [1, 2])
def test_dropout_after_sending_the_masked_input_keeps_its_input(silent):
    r = Round(n=5)
    r.run(silent=r.nodes[:silent])
    assert np.array_equal(r.proto.total(), S.sum_vectors(list(r.encoded.values()), r.proto.field))


def test_below_the_threshold_the_round_is_skipped():
    r = Round(n=5)  # threshold 3
    r.keys()
    r.share()
    with pytest.raises(RoundSkipped, match="2 of 5 nodes sent a masked input, below the reconstruction threshold 3"):
        r.mask(lost=r.nodes[:3])
    r = Round(n=3)
    r.keys(nodes=r.nodes[:1])
    with pytest.raises(RoundSkipped, match="1 of 3 nodes sent keys"):
        r.proto.require(set(r.proto.pk1), "nodes sent keys")
    r = Round(n=5)
    r.keys()
    r.share()
    r.mask()
    r.unmask(silent=r.nodes[:3])  # only 2 nodes return shares
    with pytest.raises(RoundSkipped, match="below the threshold 3"):
        r.proto.result()


# -- hostile replies: one-line reasons, never a crash ----------------------------------------------


def test_a_replayed_reply_is_dropped():
    old, new = Round(n=3), Round(n=3)
    ask_old = request(old.nodes[0], old.proto.advertise())
    _, entries = C.advertise(ask_old.content[S.RECORD], old.nodes[0])
    ask_new = request(new.nodes[0], new.proto.advertise())
    replayed = reply(ask_old, entries)  # a well-formed reply, of the round before
    assert ask_new.content[S.RECORD][S.SESSION] != ask_old.content[S.RECORD][S.SESSION]
    with pytest.raises(SecAggError, match="replayed reply"):
        new.proto.take_keys(new.nodes[0], replayed)


def test_a_masked_vector_of_the_wrong_length_or_dtype_is_dropped():
    r = Round(n=3)
    r.keys()
    r.share()
    node = r.nodes[0]
    good = r.masked_reply(node)
    vector = good.content[P.ARRAYS][S.MASKED].numpy()
    for bad, why in ((vector[:-1], "expected uint32"), (vector.astype(np.uint64), "expected uint32")):
        with pytest.raises(SecAggError, match=why):
            r.proto.take_masked(node, reply(request(node, r.proto.masked_input(node)), {}, bad))
    assert node not in r.proto.masked


def test_a_malformed_share_is_dropped():
    r = Round(n=3)
    r.keys()
    node = r.nodes[0]
    ask = request(node, r.proto.share_keys(node))
    entries = C.share_keys(r.secrets[node], ask.content[S.RECORD])
    with pytest.raises(SecAggError, match="not addressed to its neighbours"):
        r.proto.take_shares(node, reply(ask, {**entries, S.DESTINATIONS: entries[S.DESTINATIONS][:1]}))
    with pytest.raises(SecAggError, match="malformed share or seed digest"):
        r.proto.take_shares(node, reply(ask, {**entries, S.CIPHERTEXTS: [b"", *entries[S.CIPHERTEXTS][1:]]}))
    with pytest.raises(SecAggError, match="'ciphertexts' is missing or malformed"):
        r.proto.take_shares(node, reply(ask, {**entries, S.CIPHERTEXTS: [1, 2]}))
    assert node not in r.proto.digests
    r.share()
    r.mask()
    owner, holder = r.nodes[1], r.nodes[2]
    ask = request(holder, r.proto.unmask(holder))
    entries = C.unmask(r.secrets[holder], ask.content[S.RECORD])
    forged = [s if o != owner else b"\x09\x00\x00\x00" + s[4:] for o, s in zip(entries[S.OWNERS], entries[S.SHARES])]
    with pytest.raises(SecAggError, match=f"malformed share of node {owner}"):
        r.proto.take_unmask(holder, reply(ask, {**entries, S.SHARES: forged}))


def test_a_forged_share_cannot_pass_for_a_secret():
    r = Round(n=3)  # threshold 2: each secret is rebuilt from the shares of two holders
    r.keys()
    r.share()
    r.mask()
    r.unmask()
    owner = r.nodes[0]
    holder = min(r.proto.shares[owner])  # among the threshold of shares the server combines
    share = r.proto.shares[owner][holder]
    r.proto.shares[owner][holder] = share[:4] + bytes(b ^ 1 for b in share[4:])  # right layout, wrong value
    with pytest.raises(RoundSkipped, match=f"the shares of node {owner} rebuild no secret"):
        r.proto.result()


def test_the_client_refuses_an_unsafe_request():
    r = Round(n=3)
    r.keys()
    node = r.nodes[0]
    record = ConfigRecord(r.proto.share_keys(node))
    record[S.NEIGHBOURS] = [node]
    record[S.NEIGHBOUR_PK1], record[S.NEIGHBOUR_PK2] = [r.proto.pk1[node]], [r.proto.pk2[node]]
    with pytest.raises(ValueError, match="below the threshold"):
        C.share_keys(r.secrets[node], record)
    r.share()
    r.mask()
    record = ConfigRecord(r.proto.unmask(node))
    record[S.DEAD] = [record[S.ACTIVE][0]]  # a seed share and a key share of one node reveal its input
    with pytest.raises(ValueError, match="names a node twice"):
        C.unmask(r.secrets[node], record)


# -- the configuration and the strategies ----------------------------------------------------------


def test_config_errors_name_the_key():
    cases = {
        "secure_aggregation.num_shares=4": "'secure_aggregation.num_shares' must be odd",
        "secure_aggregation.mode=on": "'secure_aggregation.mode' must be one of off, secagg+",
        "secure_aggregation.reconstruction_threshold=1": "'secure_aggregation.reconstruction_threshold' must be >= 2",
        "federation.clients=1": "'federation.clients' must sample at least 2 clients",
        "secure_aggregation.reconstruction_threshold=9": "exceeds the 8 clients a round samples",
        "robustness.aggregator=median": "'robustness.aggregator' cannot be used with secure_aggregation",
        "privacy.mode=local": "'privacy.mode' cannot be used with secure_aggregation",
        "federation.clients=2000": "'secure_aggregation.modulus_bits' = 32 cannot hold the sum of 2000 clients",
    }
    from fedlora.config import apply_overrides

    for override, message in cases.items():
        raw = apply_overrides({}, ["secure_aggregation.mode=secagg+", override])
        if "privacy" in override:
            raw = apply_overrides(raw, ["privacy.noise_multiplier=1.0"])
        with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")) as err:
            RunConfig.from_dict(raw)
        assert "\n" not in str(err.value)


def test_served_strategies_take_it_and_the_others_refuse_in_one_line():
    cfg = RunConfig.from_dict({"secure_aggregation": {"mode": "secagg+"}, "lora": {"rank": 8}})
    assert set(SERVED) | set(REFUSED) <= set(STRATEGIES)
    for name in SERVED:
        get_strategy_class(name).check_setup(cfg.replace(strategy=cfg.strategy.replace(name=name)), [])
    for name in REFUSED:
        with pytest.raises(ConfigError, match=f"'secure_aggregation.mode': strategy '{name}' cannot run under"):
            get_strategy_class(name).check_setup(cfg.replace(strategy=cfg.strategy.replace(name=name)), [])


# -- distributed DP noise (privacy.noise = "distributed") ------------------------------------------


def _noisy_sum(field, deltas, std, rng):
    """Decode the sum of clients' noised summands (weight 1 each, as under central DP)."""
    from fedlora.wire.secagg import noise_levels

    summands = [S.noised_input(S.encode_input(d, 10**6, 1.0, field, rng), std, field, rng) for d in deltas]
    return S.decode_sum(S.sum_vectors(summands, field), len(deltas), field, noise_levels(std, field))


@pytest.mark.parametrize("survivors", [3, 5])
def test_distributed_noise_of_the_survivors_sums_to_at_least_the_central_std(survivors):
    """Each client's share is made for the threshold (3): 3 survivors carry exactly central DP's
    z C on the sum (z C / m on the mean of m = s), 5 carry sqrt(5/3) times it. A small field
    (10 bits) makes the noisy sums wrap below 0 and above s T: they are read back all the same."""
    from fedlora.privacy.central import central_noise_std, distributed_noise_std

    z, clip, threshold, dim = 1.3, 0.5, 3, 20_000
    field = S.FieldSpec(clipping_range=0.25, quantization_bits=10, modulus_bits=20, max_weight=1.0)
    rng = np.random.default_rng(survivors)
    deltas = [rng.normal(0, clip / np.sqrt(dim) / 2, dim) for _ in range(survivors)]  # norm ~ C / 2
    std = distributed_noise_std(z, clip, threshold)
    got = _noisy_sum(field, deltas, std, rng)
    assert got.total_weight == survivors and got.loss == 0.0 and got.clipped_fraction == 0.0  # kept on the nodes
    noise = got.mean_update * got.total_weight - sum(deltas)
    levels = (
        got.mean_update * got.total_weight / (2 * field.clipping_range / field.target) + survivors * field.target / 2
    )
    assert levels.min() < 0 and levels.max() > survivors * field.target  # the sum did wrap in the field
    target = z * clip * np.sqrt(survivors / threshold)
    # the sample variance of `dim` normal draws: chi-square with dim - 1 degrees of freedom
    low, high = (np.sqrt(stats.chi2.ppf(p, dim - 1) / (dim - 1)) for p in (1e-6, 1 - 1e-6))
    assert low * target < noise.std() < high * target, (noise.std(), target)
    assert abs(noise.mean()) < 6 * target / np.sqrt(dim)
    assert stats.kstest(noise / target, "norm").pvalue > 1e-4  # a Skellam this wide is Gaussian to the eye
    if survivors == threshold:  # on the mean of the m = s sampled: central DP's std exactly
        assert target / survivors == pytest.approx(central_noise_std(z, clip, survivors))


def test_the_protocol_carries_the_distributed_noise_through_a_dropout():
    """The real stages with noise on: the server tells each client its share's std, a client that
    drops after sharing keys takes no noise into the sum, the 4 survivors' sum carries
    sqrt(4/3) z C (threshold 3 of 5)."""
    z, clip, size = 0.8, 1.0, 6000
    r = Round(n=5, size=size)
    r.proto = Protocol(1, r.nodes, r.settings, size + S.EXTRAS, clip_norm=clip, sum_noise_std=z * clip)
    for node in r.nodes:
        r.deltas[node] = r.deltas[node] * (0.5 / np.linalg.norm(r.deltas[node]))  # within the clip
    got = r.run(lost=r.nodes[:1])
    assert r.proto.threshold == 3 and all(
        s.noise_std == pytest.approx(z * clip / np.sqrt(3)) for s in r.secrets.values()
    )
    noise = got.mean_update * got.total_weight - sum(r.deltas[n] for n in r.nodes[1:])
    target = z * clip * np.sqrt(4 / 3)
    assert 0.93 * target < noise.std() < 1.07 * target, (noise.std(), target)  # 6000 draws: +-7% is 5 sigma
    assert got.loss == 0.0


def test_the_server_adds_no_noise_under_distributed_dp():
    """The release from one unmasked sum: the server's mode adds z C / m of its own, the
    distributed mode releases the sum over m exactly (the clients' noise is in it)."""
    from fedlora.privacy.central import mean_release
    from fedlora.run.progress import Progress
    from fedlora.server.privacy import CentralDP
    from fedlora.server.secure_round import SecureRound

    spec = [("a", (50, 40)), ("b", (30,))]
    rng = np.random.default_rng(0)
    total = rng.normal(0, 0.1, 2030)
    result = S.DecodedSum(mean_update=total / 3, total_weight=3.0, loss=0.0, clipped_fraction=0.0)
    releases = {}
    for noise in ("server", "distributed"):
        privacy = {"mode": "central", "noise_multiplier": 2.0, "clip_norm": 0.5, "noise": noise}
        cfg = RunConfig.from_dict(
            {"secure_aggregation": {"mode": "secagg+"}, "privacy": privacy, "federation": {"clients": 3}}
        )
        central = CentralDP(cfg, strategy=None)
        secure = SecureRound(cfg, grid=None, strategy=None, progress=Progress(quiet=True), central=central)
        secure.last = {"secure_aggregation": {"survivors": 3, "threshold": 2}}
        releases[noise] = secure.noisy_mean(1, result, spec, sampled=3)
        assert central.last["noise"] == noise and central.last["noise_std"] == pytest.approx(2.0 * 0.5 / 3)
    exact = mean_release(S.unflatten(total, spec, torch.float64), 3)
    assert all(torch.equal(releases["distributed"][k], exact[k]) for k in exact)
    added = torch.cat([(releases["server"][k] - exact[k]).reshape(-1) for k in exact])
    assert 0.9 < float(added.std()) / (2.0 * 0.5 / 3) < 1.1
    facts = central.last["distributed_noise"]
    assert facts["calibrated_for"] == 2 and facts["effective_noise_multiplier"] == pytest.approx(2.0 * np.sqrt(1.5))
    assert facts["client_std"] == pytest.approx(2.0 * 0.5 / np.sqrt(2)) and 0 < facts["skellam_rdp_excess"] < 1e-3


def test_distributed_noise_config_errors_name_the_key():
    from fedlora.run.progress import Progress
    from fedlora.server.privacy import CentralDP
    from fedlora.server.secure_round import SecureRound

    central = {"mode": "central", "noise_multiplier": 1.0, "noise": "distributed"}
    cases = [
        ({"privacy": central}, "secure_aggregation.mode = 'off'"),
        ({"privacy": {"noise": "distributed"}, "secure_aggregation": {"mode": "secagg+"}}, "privacy.mode = 'off'"),
    ]
    for raw, why in cases:
        with pytest.raises(
            ConfigError, match=r"config key 'privacy\.noise' = 'distributed' needs privacy\.mode"
        ) as err:
            RunConfig.from_dict(raw)
        assert why in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'privacy\.noise' must be one of server, distributed"):
        RunConfig.from_dict({"privacy": {"noise": "clients"}})
    # a field too narrow for the noise is refused before round 1, naming the key to raise
    small = {"mode": "secagg+", "quantization_bits": 16, "modulus_bits": 20}
    cfg = RunConfig.from_dict({"privacy": {**central, "noise_multiplier": 4.0}, "secure_aggregation": small})
    with pytest.raises(ConfigError, match=r"'secure_aggregation\.modulus_bits' = 20 cannot hold .* raise it to \d+"):
        SecureRound(cfg, grid=None, strategy=None, progress=Progress(quiet=True), central=CentralDP(cfg, None))
    fine = {"mode": "secagg+", "quantization_bits": 40, "modulus_bits": 62}
    cfg = RunConfig.from_dict({"privacy": central, "secure_aggregation": fine})
    with pytest.raises(ConfigError, match=r"'secure_aggregation\.quantization_bits' = 40 makes each client's"):
        SecureRound(cfg, grid=None, strategy=None, progress=Progress(quiet=True), central=CentralDP(cfg, None))
