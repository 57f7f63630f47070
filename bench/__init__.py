"""`make bench`: the product measured on a real local broker and database, and beside it the
timer-and-scan design it replaced.

`python -m bench` starts a Kafka broker and a PostgreSQL server of its own
(`reconciler.localstack.LocalStack` in `.stack-bench/`, on ports of its own), runs the
selected phases one after another, prints a table and writes the figures as JSON under
`bench/results/`. Every phase gets a deployment of its own (a topic prefix and a database),
a sample order source in a process of its own, and the system under test in a process of its
own, so CPU and memory are read per process with psutil. See `bench.__main__` for the
options and `README.md`, section Benchmarks, for the figures of the last full run.
"""
