"""Scale-out: `gcr batch --workers N` and `--ray-address` on a Ray cluster.

- `work.py`: the worker, with no Ray in it: a process that owns its models and runs groups of
  jobs of some kind (a registry of kinds: `refine` today), a payload in and a stream of events out.
- `cluster.py`: the Ray side: start or join a cluster, one worker actor per GPU (or share of the
  CPUs), groups handed out as workers become free, a worker that dies replaced and its unfinished
  work handed out again.
- `refine.py`: the refine kind: the worker runs its group through the same loop as `gcr refine`
  and streams every finished round (record and pixels) back; the driver commits it to the run
  store exactly as a local batch does. The driver is the only writer of the store.
- `bench.py`: `gcr bench --workers`, what the Ray path costs and gains.

Another kind of work (issue 11's `gcr score --workers N`) needs no change to the Ray side: a function
`run_group(payload, context)` registered in `work.KINDS`, and a driver implementing `work.Work`
(its groups, how each event is committed, what is left of a group after a worker died), run with
`with Cluster(ClusterOptions(workers=N)) as cluster: cluster.run(driver)`.
"""
