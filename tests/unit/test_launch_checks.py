"""The start-up checks as pure functions: ranks from the environment, world = nodes x processes per node,
the shared-run-dir probe, and the one-line message for an unreachable rendezvous."""

from __future__ import annotations

import pytest

from distclm.dist import rendezvous_message
from distclm.errors import UserError
from distclm.launch_checks import (
    RankInfo,
    check_topology,
    launcher_node_count,
    missing_probes,
    rank_info,
    shared_dir_message,
)


def torchrun_env(rank: int, world: int, nproc: int, **extra) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(rank // nproc), "GROUP_WORLD_SIZE": str(world // nproc),
            **extra}


def cluster(nodes: int, nproc: int) -> list[RankInfo]:
    world = nodes * nproc
    return [rank_info(torchrun_env(r, world, nproc), host=f"gpu{r // nproc}") for r in range(world)]


def test_no_launcher_is_one_process():
    assert rank_info({}, host="h") == RankInfo(0, 1, 0, 1, "h", "h")


def test_torchrun_and_deepspeed_variables():
    assert rank_info(torchrun_env(5, 8, 4), host="b") == RankInfo(5, 8, 1, 4, "1", "b")
    ds = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2"}
    assert rank_info(ds, host="b") == RankInfo(3, 4, 1, 2, "1", "b")
    assert launcher_node_count(ds) == 2 and launcher_node_count(torchrun_env(0, 8, 4)) == 2


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK and LOCAL_RANK are not: ranks come from the launcher"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "LOCAL_RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE='two'"),
])
def test_hand_written_or_broken_rank_variables_are_refused(env, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        rank_info(env, host="h")


def test_topology_summary():
    summary = check_topology(cluster(2, 4), announced_nodes=2)
    assert summary == "world 8 = 2 node(s) x 4 process(es) per node (gpu0: ranks 0-3; gpu1: ranks 4-7)"
    many = check_topology(cluster(6, 1))
    assert "gpu3: rank 3; ... 2 more" in many


def test_world_must_be_nodes_times_processes_per_node():
    infos = cluster(2, 2)
    # Node 1 started 1 process while its LOCAL_WORLD_SIZE says 2: WORLD_SIZE=4 cannot be 2 x 2.
    short = [i for i in infos if i.rank != 3]
    short = [RankInfo(i.rank, 3, i.local_rank, i.local_world, i.node, i.host) for i in short]
    with pytest.raises(UserError, match=r"node 1 on gpu1 runs 1 process\(es\) .* while node 0 on gpu0 runs 2"):
        check_topology(short)


def test_uneven_nodes_are_refused():
    infos = [RankInfo(0, 3, 0, 2, "0", "a"), RankInfo(1, 3, 1, 2, "0", "a"), RankInfo(2, 3, 0, 1, "1", "b")]
    with pytest.raises(UserError, match="every node must start the same number"):
        check_topology(infos)


def test_duplicate_ranks_name_their_hosts():
    infos = [RankInfo(0, 2, 0, 1, "0", "a"), RankInfo(0, 2, 0, 1, "1", "b")]
    with pytest.raises(UserError, match=r"ranks \[0\] were given to more than one process"):
        check_topology(infos)


def test_disagreeing_world_sizes_and_node_counts():
    with pytest.raises(UserError, match="disagree on WORLD_SIZE"):
        check_topology([RankInfo(0, 2, 0, 1, "0", "a"), RankInfo(1, 4, 0, 1, "1", "b")])
    with pytest.raises(UserError, match="announced 3 node"):
        check_topology(cluster(2, 1), announced_nodes=3)
    same_node = [RankInfo(0, 2, 0, 1, "0", "a"), RankInfo(1, 2, 0, 1, "0", "b")]
    with pytest.raises(UserError, match="node rank 0 was given to launchers on 2 hosts"):
        check_topology(same_node)


def test_probe_files_seen_and_missing(tmp_path):
    for r in (0, 2):
        (tmp_path / f"rank-{r}.json").write_text("{}")
    assert missing_probes(tmp_path, 3, wait_s=0.3) == [1]
    infos = cluster(3, 1)
    msg = shared_dir_message(tmp_path, [1], infos)
    assert "is not the same folder on every node" in msg and "rank(s) 1 on node 1 on gpu1" in msg
    assert "rank 0 (node 0 on gpu0)" in msg and "--run.dir" in msg


def test_rendezvous_messages_name_endpoint_and_timeout():
    import torch.distributed as td

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "GLOO_SOCKET_IFNAME": "eth0"}
    net = td.DistNetworkError("The client socket has timed out after 5000ms while trying to connect to (10.0.0.1, 29500).")
    msg = rendezvous_message(net, 5, env, host="b")
    assert msg.startswith("rank 1 of 2 on b could not reach the rendezvous at 10.0.0.1:29500")
    assert "within 5s" in msg and "GLOO_SOCKET_IFNAME=eth0" in msg and "\n" not in msg
    store = td.DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 clients joined.")
    assert "only 1 of 2 ranks joined the rendezvous at 10.0.0.1:29500 within 5s" in rendezvous_message(store, 5, env, "a")
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:446] Connect timeout [10.0.0.1]:1234")
    assert "could not connect the backend" in rendezvous_message(gloo, 5, env, "a")


def test_ranks_running_other_versions_are_named_by_rank_and_host():
    from distclm.launch_checks import check_versions, versions

    mine = versions()
    assert set(mine) == {"distclm", "torch", "transformers", "deepspeed"}
    infos = cluster(2, 2)
    check_versions(infos, [mine] * 4)  # all the same: nothing to say
    odd = [mine, mine, {**mine, "torch": "9.9.9"}, {**mine, "deepspeed": "0.1"}]
    with pytest.raises(UserError) as e:
        check_versions(infos, odd)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("rank 2 on node 1 on gpu1 runs torch 9.9.9 (rank 0: ")
    assert "rank 0 runs on node 0 on gpu0" in line and "1 more rank(s) differ" in line
