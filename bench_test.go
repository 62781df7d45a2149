package main

// Benchmarks. Each one measures the service against the database's own
// ceiling in the same run and reports ratios, since absolute figures drift
// with whatever else the machine is doing. One iteration is one measurement
// of BENCH_DURATION (default 15s), so run them with -benchtime=1x:
//
//	go test -run='^$' -bench=. -benchtime=1x -count=3 -timeout=30m .
//
// The service runs as a child process (this test binary, re-executed), so its
// peak RSS is its own; the broker is kfake in the benchmark's process; the
// create load comes from wrk (testdata/wrk_create_order.lua).

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
)

func benchDuration(b *testing.B) time.Duration {
	d := 15 * time.Second
	if v := os.Getenv("BENCH_DURATION"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			b.Fatalf("BENCH_DURATION: %v", err)
		}
	}
	return d
}

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// pgbenchWith runs a pgbench script of testdata with the given clients.
func pgbenchWith(b *testing.B, script string, clients int, d time.Duration) float64 {
	b.Helper()
	path, err := exec.LookPath("pgbench")
	if err != nil {
		b.Fatal("pgbench not found: install PostgreSQL's client tools (Debian: postgresql-client or postgresql-contrib)")
	}
	schema, _, _ := schemaWithTables(b)
	cc := testDB.Config().ConnConfig
	secs := max(1, int(d.Seconds()))
	cmd := exec.Command(path, "-n", "-f", script, "-c", strconv.Itoa(clients), "-j", strconv.Itoa(min(clients, 2)), "-T", strconv.Itoa(secs),
		"-h", cc.Host, "-p", strconv.Itoa(int(cc.Port)), "-U", cc.User, cc.Database)
	cmd.Env = append(os.Environ(), "PGOPTIONS=-c search_path="+schema, "PGPASSWORD="+cc.Password)
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("pgbench: %v\n%s", err, out)
	}
	m := tpsRE.FindSubmatch(out)
	if m == nil {
		b.Fatalf("no tps in pgbench output:\n%s", out)
	}
	tps, _ := strconv.ParseFloat(string(m[1]), 64)
	return tps
}

// benchService starts the service as a child on a fresh schema.
func benchService(b *testing.B, br *broker, extra map[string]string) (*child, string) {
	b.Helper()
	dbURL := newSchema(b)
	env := childEnvFor(dbURL, br)
	env["LOG_LEVEL"] = "warn"
	if addr := os.Getenv("BENCH_PPROF_ADDR"); addr != "" {
		env["PPROF_ADDR"] = addr
	}
	for k, v := range extra {
		env[k] = v
	}
	c := startChild(b, env)
	c.waitReady(b)
	return c, dbURL
}

// peakRSS is the child's high-water resident set size in MiB.
func peakRSS(b *testing.B, c *child) float64 {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	b.Fatal("no VmHWM in /proc/<pid>/status")
	return 0
}

var (
	wrkRateRE     = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkP99RE      = regexp.MustCompile(`\n\s+99%\s+([0-9.]+)(us|ms|s)\b`)
	wrkRequestsRE = regexp.MustCompile(`([0-9]+) requests in`)
	wrkFailedRE   = regexp.MustCompile(`Non-2xx or 3xx responses: ([0-9]+)|Socket errors: (.*)`)
)

// load posts orders from n keep-alive connections for d with wrk
// (testdata/wrk_create_order.lua), a load generator in C that costs the
// machine little next to the service, as pgbench's client does next to the
// database. It returns the orders created per second and the 99th percentile
// of their latency, and fails on any answer but 201 (wrk counts 2xx; the
// service's own count of created orders must match).
func load(b *testing.B, baseURL string, n int, d time.Duration) (rate float64, p99 time.Duration) {
	b.Helper()
	path, err := exec.LookPath("wrk")
	if err != nil {
		b.Fatal("wrk not found: install it (Debian: wrk)")
	}
	before := metric(b, baseURL, "orders_created_total")
	cmd := exec.Command(path, "-t", strconv.Itoa(min(n, 2)), "-c", strconv.Itoa(n), "-d", strconv.Itoa(max(1, int(d.Seconds())))+"s",
		"--latency", "-s", "testdata/wrk_create_order.lua", baseURL+"/orders")
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("wrk: %v\n%s", err, out)
	}
	if m := wrkFailedRE.FindSubmatch(out); m != nil {
		b.Fatalf("requests failed during the load:\n%s", out)
	}
	m, p, c := wrkRateRE.FindSubmatch(out), wrkP99RE.FindSubmatch(out), wrkRequestsRE.FindSubmatch(out)
	if m == nil || p == nil || c == nil {
		b.Fatalf("no rate, p99 or count in wrk's output:\n%s", out)
	}
	rate, _ = strconv.ParseFloat(string(m[1]), 64)
	v, _ := strconv.ParseFloat(string(p[1]), 64)
	p99 = time.Duration(v * float64(map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[string(p[2])]))
	// wrk stops with up to n requests in flight, which the service may
	// still complete.
	answered, _ := strconv.ParseFloat(string(c[1]), 64)
	if created := metric(b, baseURL, "orders_created_total") - before; created < answered || created > answered+float64(n) {
		b.Fatalf("wrk saw %v answers, the service created %v orders", answered, created)
	}
	return rate, p99
}

// allPublished waits until every order the service created is on pay-order:
// a create rate that the relay cannot follow is no rate.
func allPublished(b *testing.B, br *broker, c *child) {
	b.Helper()
	created := int64(metric(b, c.url, "orders_created_total"))
	waitFor(b, 60*time.Second, "every order on pay-order", func() bool {
		return endOffsets(b, br, br.topic(topicPayOrder)) >= created
	})
}

// BenchmarkCreateThroughput: POST /orders from 16 connections (wrk) with the
// relay and consumer running, against pgbench running the same two inserts
// with 16 clients, in alternating turns of the same run (see alternate);
// every order must reach pay-order. The ceiling ("ratio") is
// pgbench without a NOTIFY (testdata/pgbench_create_order_nonotify.sql): a
// notifying commit holds a cluster-wide lock through its WAL flush, so the
// NOTIFY variant ("ratio_notify", testdata/pgbench_create_order.sql) cannot
// group commits and is the weaker baseline. "shared" is the default (commits
// shared by up to 64 requests, 2 writers); "single" turns that off: every
// request its own transaction, 16 at a time like pgbench's clients.
func BenchmarkCreateThroughput(b *testing.B) {
	for _, mode := range []struct {
		name string
		env  map[string]string
	}{
		{"single", map[string]string{"CREATE_BATCH_MAX": "1", "CREATE_WRITERS": "16"}},
		{"shared", nil},
	} {
		b.Run(mode.name, func(b *testing.B) {
			d := benchDuration(b)
			for range b.N {
				br := newBroker(b, true)
				c, _ := benchService(b, br, mode.env)
				m := alternate(b, c, 16, d,
					"testdata/pgbench_create_order_nonotify.sql", "testdata/pgbench_create_order.sql")
				allPublished(b, br, c)
				ceiling, notifying, rate, p99, steal := m.ceilings[0], m.ceilings[1], m.rate, m.p99, m.steal
				m.report(b)
				b.ReportMetric(float64(p99.Microseconds())/1000, "p99_ms")
				b.ReportMetric(ceiling, "pgbench_tps")
				b.ReportMetric(notifying, "pgbench_notify_tps")
				b.ReportMetric(rate, "orders/s")
				b.ReportMetric(rate/ceiling, "ratio")
				b.ReportMetric(rate/notifying, "ratio_notify")
				b.ReportMetric(peakRSS(b, c), "peak_rss_MiB")
				b.ReportMetric(metric(b, c.url, "orders_created_total")/metric(b, c.url, "order_write_batches_total"), "orders/commit")
				b.ReportMetric(steal, "steal_%")
			}
		})
	}
}

// benchTurns is how many turns the ceiling and the service each take in one
// measurement. This machine's speed drifts from one minute to the next (a
// neighbour's load shows as CPU steal); short alternating turns expose both
// sides to the same drift, where one long run of each did not.
const benchTurns = 3

// alternate measures, in benchTurns rounds of d/benchTurns each, every
// pgbench script of scripts with conns clients, then the service c under the
// create load of conns connections. It returns each script's mean tps (in
// the order of scripts), the service's mean orders per second and the
// highest p99 of its turns, and the share of the machine's CPU time the
// hypervisor stole meanwhile, in percent.
func alternate(b *testing.B, c *child, conns int, d time.Duration, scripts ...string) turns {
	b.Helper()
	turn := max(time.Second, d/benchTurns)
	m := turns{ceilings: make([]float64, len(scripts))}
	stolen, total := cpuSteal()
	var svcTicks, pgTicks, pgbenchTicks, orders, txs float64
	for range benchTurns {
		for i, script := range scripts {
			pg := postgresTicks(b)
			tps := pgbenchWith(b, script, conns, turn)
			if i == 0 {
				pgbenchTicks += postgresTicks(b) - pg
				txs += tps * turn.Seconds()
			}
			m.ceilings[i] += tps / benchTurns
		}
		pg, svc, created := postgresTicks(b), processTicks(b, c.cmd.Process.Pid), metric(b, c.url, "orders_created_total")
		r, p := load(b, c.url, conns, turn)
		pgTicks += postgresTicks(b) - pg
		svcTicks += processTicks(b, c.cmd.Process.Pid) - svc
		orders += metric(b, c.url, "orders_created_total") - created
		m.rate += r / benchTurns
		m.p99 = max(m.p99, p)
	}
	stolen2, total2 := cpuSteal()
	if total2 > total {
		m.steal = 100 * float64(stolen2-stolen) / float64(total2-total)
	}
	const usPerTick = 1e6 / 100 // USER_HZ
	m.svcPerOrder, m.pgPerOrder = svcTicks*usPerTick/orders, pgTicks*usPerTick/orders
	m.pgPerTx = pgbenchTicks * usPerTick / txs
	return m
}

// turns is what alternate measured: the ceilings' rates, the service's rate
// and worst p99, the CPU steal, and the CPU time (µs) the service and
// PostgreSQL spent per order, and PostgreSQL per transaction of the first
// ceiling.
type turns struct {
	ceilings                         []float64
	rate                             float64
	p99                              time.Duration
	steal                            float64
	svcPerOrder, pgPerOrder, pgPerTx float64
}

// report adds the CPU budget to a benchmark's figures.
func (m turns) report(b *testing.B) {
	b.ReportMetric(m.svcPerOrder, "svc_us/order")
	b.ReportMetric(m.pgPerOrder, "pg_us/order")
	b.ReportMetric(m.pgPerTx, "pg_us/pgbench_tx")
}

// processTicks is the CPU time (user and system, in USER_HZ ticks) of process
// pid and its threads.
func processTicks(b *testing.B, pid int) float64 {
	b.Helper()
	f, ok := statTicks(pid)
	if !ok {
		b.Fatalf("no /proc/%d/stat", pid)
	}
	return f[0] + f[1]
}

// postgresTicks is the CPU time of every PostgreSQL process on this machine:
// those alive, and, through the postmaster's children's times, those that
// ended (pgbench's backends end with each run).
func postgresTicks(b *testing.B) float64 {
	b.Helper()
	dirs, _ := os.ReadDir("/proc")
	var sum float64
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		if f, ok := statTicks(pid); ok {
			sum += f[0] + f[1] + f[2] + f[3]
		}
	}
	return sum
}

// statTicks reads utime, stime, cutime and cstime of /proc/pid/stat.
func statTicks(pid int) ([4]float64, bool) {
	var f [4]float64
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return f, false
	}
	// The command, in parentheses, may hold spaces: count from its end.
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	for i := range f { // fields 14-17 of the line, 12-15 after the command
		f[i], _ = strconv.ParseFloat(fields[11+i], 64)
	}
	return f, true
}

// cpuSteal reads the machine's stolen and total CPU time (in ticks) from
// /proc/stat; zeros where there is none.
func cpuSteal() (stolen, total uint64) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
	for i, f := range fields[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		total += v
		if i == 7 {
			stolen = v
		}
	}
	return stolen, total
}

// BenchmarkPublishLatency: orders at a steady 200/s; the time from each 201
// to its record being readable on pay-order.
func BenchmarkPublishLatency(b *testing.B) {
	d := benchDuration(b)
	for range b.N {
		br := newBroker(b, true)
		c, _ := benchService(b, br, nil)
		arrived := map[string]time.Time{}
		var mu sync.Mutex
		ctx, cancel := context.WithCancel(context.Background())
		cl, err := kgo.NewClient(kgo.SeedBrokers(br.addrs...), kgo.ConsumeTopics(br.topic(topicPayOrder)),
			kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(time.Second))
		if err != nil {
			b.Fatal(err)
		}
		consumed := make(chan struct{})
		go func() {
			defer close(consumed)
			for ctx.Err() == nil {
				fetches := cl.PollFetches(ctx)
				now := time.Now()
				mu.Lock()
				fetches.EachRecord(func(r *kgo.Record) { arrived[string(r.Key)] = now })
				mu.Unlock()
			}
		}()
		answered := map[string]time.Time{}
		tick := time.NewTicker(5 * time.Millisecond) // 200/s
		client := &http.Client{}
		end := time.Now().Add(d)
		var wg sync.WaitGroup
		for time.Now().Before(end) {
			<-tick.C
			wg.Go(func() {
				req, _ := http.NewRequest("POST", c.url+"/orders", strings.NewReader(`{"amount": 1}`))
				req.Header.Set("X-User-Id", "latency")
				resp, err := client.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				at := time.Now()
				r := response{status: resp.StatusCode}
				r.body, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				if r.status != http.StatusCreated {
					b.Errorf("POST: %d %s", r.status, r.body)
					return
				}
				o := r.order(b)
				mu.Lock()
				answered[o.ID] = at
				mu.Unlock()
			})
		}
		tick.Stop()
		wg.Wait()
		waitFor(b, 30*time.Second, "every order on pay-order", func() bool {
			mu.Lock()
			defer mu.Unlock()
			for id := range answered {
				if _, ok := arrived[id]; !ok {
					return false
				}
			}
			return true
		})
		cancel()
		<-consumed
		cl.Close()
		var lat []time.Duration
		for id, at := range answered {
			// The record can be fetched before the client has read the
			// 201: that is zero latency, not negative.
			lat = append(lat, max(0, arrived[id].Sub(at)))
		}
		slices.Sort(lat)
		ms := func(q float64) float64 {
			return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))].Microseconds()) / 1000
		}
		b.ReportMetric(float64(len(lat))/d.Seconds(), "orders/s")
		b.ReportMetric(ms(0.50), "p50_ms")
		b.ReportMetric(ms(0.99), "p99_ms")
		b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max_ms")
	}
}

// seedOrders inserts n PENDING orders in one statement.
func seedOrders(b testing.TB, dbURL string, n int) {
	b.Helper()
	if _, err := schemaPool(b, dbURL).Exec(context.Background(), `
		INSERT INTO orders (id, user_id, amount, description, request_hash)
		SELECT gen_random_uuid(), 'seed', 100, 'seeded', '\x00' FROM generate_series(1, $1)`, n); err != nil {
		b.Fatal(err)
	}
}

// seedOutbox writes an unpublished pay-order event for every order, as
// createOrders would have, in one transaction that wakes the relay.
func seedOutbox(b *testing.B, dbURL, topic string) {
	b.Helper()
	err := pgx.BeginFunc(context.Background(), schemaPool(b, dbURL), func(tx pgx.Tx) error {
		if _, err := tx.Exec(context.Background(), `
			WITH e AS (SELECT o.*, gen_random_uuid() AS event_id FROM orders o)
			INSERT INTO outbox (topic, key, event_id, payload)
			SELECT $1, id::text, event_id, json_build_object('event_id', event_id, 'order_id', id,
			       'user_id', user_id, 'amount', amount, 'created_at', created_at)
			FROM e`, topic); err != nil {
			return err
		}
		return notify(context.Background(), tx, outboxChannel, "")
	})
	if err != nil {
		b.Fatal(err)
	}
}

// waitForOffsets returns when topic's end offsets add up to n, asking every
// 5ms on one client: a drain of 20,000 events takes under half a second.
func waitForOffsets(b *testing.B, br *broker, topic string, n int64, timeout time.Duration) time.Time {
	b.Helper()
	adm, closeAdm := adminClient(b, br)
	defer closeAdm()
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if countRecords(b, adm, topic) >= n {
			return time.Now()
		}
	}
	b.Fatalf("timed out after %s waiting for %d records on %s", timeout, n, topic)
	return time.Time{}
}

// BenchmarkBacklogDrain: 1,000, 20,000 or 200,000 unpublished outbox rows (as
// after a broker outage) appear at once; events per second until all are on
// pay-order. How the drain rate changes with the backlog is the curve.
func BenchmarkBacklogDrain(b *testing.B) {
	for _, n := range []int{1000, 20000, 200000} {
		b.Run(fmt.Sprintf("backlog_%d", n), func(b *testing.B) {
			for range b.N {
				br := newBroker(b, true)
				_, dbURL := benchService(b, br, nil)
				seedOrders(b, dbURL, n)
				seedOutbox(b, dbURL, br.topic(topicPayOrder))
				// From the backlog's commit: inserting 200,000 rows
				// takes seconds, and is not the relay's work.
				start := time.Now()
				end := waitForOffsets(b, br, br.topic(topicPayOrder), int64(n), 300*time.Second)
				b.ReportMetric(float64(n)/end.Sub(start).Seconds(), "events/s")
			}
		})
	}
}

// BenchmarkCreateCurve: how create throughput and p99 latency change with the
// number of connections (1, 4, 16, 64), each beside pgbench without NOTIFY
// running the same two inserts with as many clients, in the same run.
func BenchmarkCreateCurve(b *testing.B) {
	for _, conns := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("conns_%d", conns), func(b *testing.B) {
			d := benchDuration(b)
			for range b.N {
				br := newBroker(b, true)
				c, _ := benchService(b, br, nil)
				m := alternate(b, c, conns, d, "testdata/pgbench_create_order_nonotify.sql")
				allPublished(b, br, c)
				b.ReportMetric(m.rate, "orders/s")
				b.ReportMetric(float64(m.p99.Microseconds())/1000, "p99_ms")
				b.ReportMetric(m.ceilings[0], "pgbench_tps")
				b.ReportMetric(m.rate/m.ceilings[0], "ratio")
				b.ReportMetric(m.steal, "steal_%")
				m.report(b)
			}
		})
	}
}

// BenchmarkResultsApplied: 20,000 payment-results for PENDING orders;
// applied per second, from the first produce to the last order PAID.
func BenchmarkResultsApplied(b *testing.B) {
	const n = 20000
	for range b.N {
		br := newBroker(b, true)
		c, dbURL := benchService(b, br, nil)
		seedOrders(b, dbURL, n)
		ids := orderIDs(b, dbURL)
		// The consumer has joined its group once a first result is applied.
		produce(b, br, br.topic(topicPaymentResults), ids[0], `{"order_id": "`+ids[0]+`", "status": "PAID"}`)
		waitFor(b, 30*time.Second, "consumer ready", func() bool { return metric(b, c.url, `payment_results_applied_total{status="PAID"}`) == 1 })

		cl, err := kgo.NewClient(kgo.SeedBrokers(br.addrs...), kgo.ProducerLinger(0))
		if err != nil {
			b.Fatal(err)
		}
		var recs []*kgo.Record
		for _, id := range ids[1:] {
			recs = append(recs, &kgo.Record{Topic: br.topic(topicPaymentResults), Key: []byte(id),
				Value: []byte(`{"order_id": "` + id + `", "status": "PAID"}`)})
		}
		start := time.Now()
		if err := cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
			b.Fatal(err)
		}
		cl.Close()
		waitFor(b, 120*time.Second, "every order PAID", func() bool {
			return count(b, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == n
		})
		b.ReportMetric(float64(n-1)/time.Since(start).Seconds(), "results/s")
	}
}

// BenchmarkStreamFlood: POST /orders latency with the event streams at their
// cap and twice as many clients that never read knocking, against the same
// service unloaded, in alternating turns. The service runs with a container's
// RLIMIT_NOFILE (1024); wrk posts from 4 connections.
func BenchmarkStreamFlood(b *testing.B) {
	d := benchDuration(b)
	for range b.N {
		br := newBroker(b, true)
		c, _ := benchService(b, br, map[string]string{"STREAMS_PER_USER": "10000", rlimitEnv: "1024"})
		cap := int(metric(b, c.url, "http_streams_max"))
		r := do(b, "POST", c.url+"/orders", `{"amount": 5}`, "X-User-Id", "bench")
		id := r.order(b).ID
		addr := strings.TrimPrefix(c.url, "http://")
		req := "GET /orders/" + id + "/events HTTP/1.1\r\nHost: x\r\nX-User-Id: bench\r\n\r\n"
		var idle, loaded time.Duration
		var flood []net.Conn
		for turn := range 2 * benchTurns {
			if turn%2 == 0 {
				_, p99 := load(b, c.url, 4, max(time.Second, d/(2*benchTurns)))
				idle = max(idle, p99)
				continue
			}
			refused := metric(b, c.url, `http_streams_refused_total{cap="all"}`)
			for len(flood) < 3*cap { // the cap, then twice as many refused
				conn, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				io.WriteString(conn, req) // and never read
				flood = append(flood, conn)
			}
			waitFor(b, 20*time.Second, "the streams at their cap, the rest refused", func() bool {
				return metric(b, c.url, "http_streams_open") == float64(cap) &&
					metric(b, c.url, `http_streams_refused_total{cap="all"}`) >= refused+float64(2*cap)
			})
			_, p99 := load(b, c.url, 4, max(time.Second, d/(2*benchTurns)))
			loaded = max(loaded, p99)
			if r := do(b, "GET", c.url+"/healthz", ""); r.status != http.StatusOK {
				b.Fatalf("/healthz with the streams at their cap: %d", r.status)
			}
			for _, conn := range flood {
				conn.Close()
			}
			flood = flood[:0]
			waitFor(b, 20*time.Second, "the streams closed", func() bool { return metric(b, c.url, "http_streams_open") == 0 })
		}
		b.ReportMetric(float64(cap), "streams_max")
		b.ReportMetric(metric(b, c.url, `http_streams_refused_total{cap="all"}`), "refused")
		b.ReportMetric(float64(idle.Microseconds())/1000, "p99_idle_ms")
		b.ReportMetric(float64(loaded.Microseconds())/1000, "p99_flood_ms")
		b.ReportMetric(float64(loaded)/float64(idle), "ratio")
		b.ReportMetric(peakRSS(b, c), "peak_rss_MiB")
	}
}

// BenchmarkNotifierSignal: what one status change costs with 10 000 streams
// open on other orders, against the same with one stream.
func BenchmarkNotifierSignal(b *testing.B) {
	perSignal := func(streams int) time.Duration {
		n := newNotifier(nil, nil, nil, statusChannel)
		ids := make([]string, streams)
		for i := range ids {
			ids[i] = newUUID()
			_, cancel := n.subscribe(statusChannel, ids[i])
			defer cancel()
		}
		const signals = 100_000
		start := time.Now()
		for i := range signals {
			n.signal(statusChannel, ids[i%len(ids)])
		}
		return time.Since(start) / signals
	}
	for range b.N {
		one, many := perSignal(1), perSignal(10_000)
		b.ReportMetric(float64(one.Nanoseconds()), "ns/signal_1_stream")
		b.ReportMetric(float64(many.Nanoseconds()), "ns/signal_10000_streams")
		b.ReportMetric(float64(many)/float64(one), "ratio")
	}
}

// BenchmarkScale: the same service on a database holding a long history and
// on an empty one, side by side. The big one is preloaded with
// BENCH_SCALE_ORDERS orders (10 000 000 by default; a hundredth of them one
// user's) whose events are long published: the outbox keeps none, by design.
// It reports the ratio of their create rates in alternating turns, the rows
// each reads by sequential scans of orders and outbox per minute while idle
// (BENCH_IDLE, 60s by default, /metrics scraped every 15s), the p99 of GET
// /orders for the heavy user at its first page and 30 pages deep, the p99 of
// a /metrics scrape, what is left in the outbox right after the load, and
// the bytes of each table.
func BenchmarkScale(b *testing.B) {
	n := 10_000_000
	if v := os.Getenv("BENCH_SCALE_ORDERS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 10_000 {
			b.Fatalf("BENCH_SCALE_ORDERS=%q: want an integer of 10000 or more", v)
		}
	}
	idle := time.Minute
	if v := os.Getenv("BENCH_IDLE"); v != "" {
		var err error
		if idle, err = time.ParseDuration(v); err != nil {
			b.Fatalf("BENCH_IDLE: %v", err)
		}
	}
	d := benchDuration(b)
	for range b.N {
		bigURL, bigSchema := preloadOrders(b, n)
		emptySchema := createSchema(b)
		emptyURL := newSchemaURL(emptySchema)
		big := scaleService(b, bigURL)
		empty := scaleService(b, emptyURL)

		var bigRate, emptyRate float64
		turn := max(time.Second, d/benchTurns)
		for range benchTurns {
			r, _ := load(b, big.url, 16, turn)
			bigRate += r / benchTurns
			r, _ = load(b, empty.url, 16, turn)
			emptyRate += r / benchTurns
		}
		left := count(b, bigURL, `SELECT count(*) FROM outbox`)
		for _, u := range []string{bigURL, emptyURL} {
			waitFor(b, 60*time.Second, "the outbox drained", func() bool { return count(b, u, `SELECT count(*) FROM outbox`) == 0 })
		}

		bigScans, emptyScans := seqRowsRead(b, bigSchema), seqRowsRead(b, emptySchema)
		for end := time.Now().Add(idle); time.Now().Before(end); {
			do(b, "GET", big.url+"/metrics", "")
			do(b, "GET", empty.url+"/metrics", "")
			time.Sleep(min(15*time.Second, time.Until(end))) // a scrape interval, not a wait for a condition
		}
		bigScans, emptyScans = seqRowsRead(b, bigSchema)-bigScans, seqRowsRead(b, emptySchema)-emptyScans
		perMinute := float64(time.Minute) / float64(idle)

		first, deep := listP99(b, big.url, n/100)
		var scrape []time.Duration
		for range 50 {
			start := time.Now()
			do(b, "GET", big.url+"/metrics", "")
			scrape = append(scrape, time.Since(start))
		}
		var ordersBytes, outboxBytes float64
		if err := schemaPool(b, bigURL).QueryRow(context.Background(),
			`SELECT pg_total_relation_size('orders'), pg_total_relation_size('outbox')`).Scan(&ordersBytes, &outboxBytes); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(n), "orders")
		b.ReportMetric(bigRate, "orders/s_big")
		b.ReportMetric(emptyRate, "orders/s_empty")
		b.ReportMetric(bigRate/emptyRate, "ratio")
		b.ReportMetric(float64(bigScans)*perMinute, "seq_rows/min_big")
		b.ReportMetric(float64(emptyScans)*perMinute, "seq_rows/min_empty")
		b.ReportMetric(float64(left), "outbox_left")
		b.ReportMetric(ms(first), "list_p99_ms")
		b.ReportMetric(ms(deep), "list_page30_p99_ms")
		b.ReportMetric(ms(p99Of(scrape)), "scrape_p99_ms")
		b.ReportMetric(ordersBytes/float64(n), "orders_B/order")
		b.ReportMetric(outboxBytes, "outbox_B")
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func p99Of(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[len(ds)*99/100]
}

// scaleService starts the service as a child on dbURL, with its own broker.
func scaleService(b *testing.B, dbURL string) *child {
	b.Helper()
	env := childEnvFor(dbURL, newBroker(b, true))
	env["LOG_LEVEL"] = "warn"
	c := startChild(b, env)
	c.waitReady(b)
	return c
}

// preloadOrders makes a schema holding n paid orders, ordered ids and times a
// millisecond apart, one in a hundred the user "scale-heavy"'s, and analyzed.
// The index for listing is built after the rows, which is quicker.
func preloadOrders(b *testing.B, n int) (dbURL, schema string) {
	b.Helper()
	schema, dbURL, db := schemaWithTables(b)
	ctx := context.Background()
	start := time.Now()
	for _, stmt := range []string{
		`DROP INDEX orders_user_created_idx`,
		fmt.Sprintf(`INSERT INTO orders (id, user_id, amount, status, created_at, updated_at)
			SELECT ('01890000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
			       CASE WHEN g %% 100 = 0 THEN 'scale-heavy' ELSE 'user-' || (g %% 50000) END,
			       1 + g %% 100000, 'PAID', t, t
			FROM generate_series(1, %d) AS g, LATERAL (SELECT now() - (%d - g) * interval '1 millisecond' AS t) AS at`, n, n),
		`SET maintenance_work_mem = '1GB'`,
		`CREATE INDEX orders_user_created_idx ON orders (user_id, created_at DESC, id DESC)`,
		`VACUUM ANALYZE orders`,
	} {
		if _, err := db.Exec(ctx, stmt); err != nil {
			b.Fatalf("preload: %v", err)
		}
	}
	b.Logf("preloaded %d orders in %s", n, time.Since(start).Round(time.Second))
	return dbURL, schema
}

// seqRowsRead is the rows read by sequential scans of orders and outbox in
// schema so far, once the backends have reported them.
func seqRowsRead(b *testing.B, schema string) int64 {
	b.Helper()
	time.Sleep(2 * time.Second) // backends report their statistics at most once a second, when idle
	var n int64
	if err := testDB.QueryRow(context.Background(), `SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables
		WHERE schemaname = $1 AND relname IN ('orders', 'outbox')`, schema).Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

// listP99 is the p99 of 200 requests for the first page of the heavy user's
// orders, and of 200 for its 30th page; pages of 50, or fewer if the user has
// not 31 pages of 50.
func listP99(b *testing.B, baseURL string, orders int) (first, deep time.Duration) {
	b.Helper()
	limit := max(1, min(50, orders/31))
	page := func(cursor string) (time.Duration, string) {
		url := baseURL + "/orders?limit=" + strconv.Itoa(limit)
		if cursor != "" {
			url += "&cursor=" + cursor
		}
		start := time.Now()
		r := do(b, "GET", url, "", "X-User-Id", "scale-heavy")
		took := time.Since(start)
		var p orderPage
		r.json(b, &p)
		if r.status != http.StatusOK || len(p.Orders) != limit {
			b.Fatalf("GET /orders for the heavy user (%d orders): %d, %d orders", orders, r.status, len(p.Orders))
		}
		return took, p.NextCursor
	}
	cursor := ""
	for range 29 {
		_, cursor = page(cursor)
	}
	var firsts, deeps []time.Duration
	for range 200 {
		d, _ := page("")
		firsts = append(firsts, d)
		d, _ = page(cursor)
		deeps = append(deeps, d)
	}
	return p99Of(firsts), p99Of(deeps)
}

// BenchmarkHeldHorizon: orders offered at a steady BENCH_HORIZON_RATE a second
// (1 000 by default) for BENCH_HORIZON_PERIODS periods of BENCH_HORIZON_PERIOD
// (10 of 1 minute), while another session of the same database holds vacuum's
// xmin horizon (a REPEATABLE READ transaction that has taken its snapshot, as
// pg_dump or a long report does), and the same with nothing held. Per period:
// the p50 and p99 of the time from each 201 to its record on pay-order, the
// database's buffers touched per order created (pg_stat_database, blks_hit
// + blks_read), and outbox's dead rows at its end. The ceiling of each run is
// its own first period: the ratios say how much the last period costs more.
func BenchmarkHeldHorizon(b *testing.B) {
	rate := envInt(b, "BENCH_HORIZON_RATE", 1000)
	periods := envInt(b, "BENCH_HORIZON_PERIODS", 10)
	period := time.Minute
	if v := os.Getenv("BENCH_HORIZON_PERIOD"); v != "" {
		var err error
		if period, err = time.ParseDuration(v); err != nil {
			b.Fatalf("BENCH_HORIZON_PERIOD: %v", err)
		}
	}
	for _, held := range []bool{true, false} {
		name := "not_held"
		if held {
			name = "held"
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				heldHorizonRun(b, held, rate, periods, period)
			}
		})
	}
}

func envInt(b *testing.B, key string, def int) int {
	b.Helper()
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive integer", key, v)
	}
	return n
}

// horizonPeriod is what heldHorizonRun measured in one period.
type horizonPeriod struct {
	p50, p99     time.Duration
	orders       int
	buffers      float64 // per order
	deadOutbox   int
	outboxBytes  int // the table and its index
	failedAnswer int
}

func heldHorizonRun(b *testing.B, held bool, rate, periods int, period time.Duration) {
	b.Helper()
	ctx := context.Background()
	br := newBroker(b, true)
	c, dbURL := benchService(b, br, nil)
	db := schemaPool(b, dbURL)
	if held {
		holdHorizon(b, false)
	}

	// Records on pay-order, by order id, with when they were read.
	arrived := map[string]time.Time{}
	var mu sync.Mutex
	cctx, cancel := context.WithCancel(ctx)
	cl, err := kgo.NewClient(kgo.SeedBrokers(br.addrs...), kgo.ConsumeTopics(br.topic(topicPayOrder)),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		for cctx.Err() == nil {
			fetches := cl.PollFetches(cctx)
			now := time.Now()
			mu.Lock()
			fetches.EachRecord(func(r *kgo.Record) { arrived[string(r.Key)] = now })
			mu.Unlock()
		}
	}()
	defer func() {
		cancel()
		<-consumed
		cl.Close()
	}()

	buffers := func() float64 {
		var n float64
		if err := db.QueryRow(ctx, `SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			b.Fatal(err)
		}
		return n
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: 10 * time.Second}
	every := time.Second / time.Duration(rate)
	results := make([]horizonPeriod, periods)
	answered := make([]map[string]time.Time, periods)
	var failed atomic.Int64
	for p := range periods {
		answered[p] = map[string]time.Time{}
		before := buffers()
		created := metric(b, c.url, "orders_created_total")
		tick := time.NewTicker(every)
		var wg sync.WaitGroup
		for end := time.Now().Add(period); time.Now().Before(end); {
			<-tick.C
			wg.Go(func() {
				req, _ := http.NewRequest("POST", c.url+"/orders", strings.NewReader(`{"amount": 1}`))
				req.Header.Set("X-User-Id", "horizon")
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					return
				}
				at := time.Now()
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusCreated {
					failed.Add(1)
					return
				}
				var o Order
				if json.Unmarshal(body, &o) != nil {
					failed.Add(1)
					return
				}
				mu.Lock()
				answered[p][o.ID] = at
				mu.Unlock()
			})
		}
		tick.Stop()
		wg.Wait()
		results[p].orders = int(metric(b, c.url, "orders_created_total") - created)
		results[p].buffers = (buffers() - before) / float64(max(1, results[p].orders))
		results[p].deadOutbox = count(b, dbURL, `SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables
			WHERE schemaname = current_schema() AND relname = 'outbox'`)
		results[p].outboxBytes = count(b, dbURL, `SELECT pg_total_relation_size('outbox')`)
		results[p].failedAnswer = int(failed.Swap(0))
	}
	waitFor(b, 120*time.Second, "every order on pay-order", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, a := range answered {
			for id := range a {
				if _, ok := arrived[id]; !ok {
					return false
				}
			}
		}
		return true
	})
	mu.Lock()
	for p, a := range answered {
		var lat []time.Duration
		for id, at := range a {
			lat = append(lat, max(0, arrived[id].Sub(at)))
		}
		slices.Sort(lat)
		if len(lat) > 0 {
			results[p].p50, results[p].p99 = lat[len(lat)/2], lat[len(lat)*99/100]
		}
	}
	mu.Unlock()
	var worst time.Duration
	for p, r := range results {
		// Printed, not logged: a benchmark's log is cut to ten lines.
		fmt.Printf("%s held=%v period %d: %d orders (%d failed), publish p50 %.1f ms p99 %.1f ms, %.1f buffers/order, outbox dead rows %d, outbox %.0f MB\n",
			b.Name(), held, p+1, r.orders, r.failedAnswer, ms(r.p50), ms(r.p99), r.buffers, r.deadOutbox, float64(r.outboxBytes)/1e6)
		worst = max(worst, r.p99)
		if r.failedAnswer > 0 {
			b.Errorf("period %d: %d requests failed", p+1, r.failedAnswer)
		}
	}
	first, last := results[0], results[len(results)-1]
	b.ReportMetric(ms(first.p50), "p50_ms_first")
	b.ReportMetric(ms(last.p50), "p50_ms_last")
	b.ReportMetric(ms(worst), "p99_ms_worst")
	b.ReportMetric(first.buffers, "buffers/order_first")
	b.ReportMetric(last.buffers, "buffers/order_last")
	b.ReportMetric(float64(last.p50)/float64(max(1, first.p50)), "ratio_p50")
	b.ReportMetric(last.buffers/first.buffers, "ratio_buffers")
	b.ReportMetric(float64(last.deadOutbox), "outbox_dead_rows_last")
	b.ReportMetric(float64(last.outboxBytes)/1e6, "outbox_MB_last")
}

// BenchmarkOverload: what the service does when more orders arrive than it can
// write. Its capacity is measured first, in the same run, in two ways:
// POST /orders in a closed loop (each client sends its next request when the
// last one is answered) from 16 clients, as the create benchmarks load it,
// and from 256, enough that the writers' batches are full. Then orders are
// offered open-loop at 1.5 and 3 times each: a request is due at its time
// whether or not the earlier ones were answered, every client gives up after
// 5 s, and a request's latency counts from when it was due, so that time
// spent waiting for a free client is not hidden. Each measurement lasts
// BENCH_DURATION. Reported per offer: the goodput (201s a second) as a ratio
// of the best goodput of the run, the 503s, the other answers and the client
// timeouts, and the p50 and p99 of the 201s. The load comes from this process,
// on the machine's two cores with the service and PostgreSQL.
func BenchmarkOverload(b *testing.B) {
	d := benchDuration(b)
	for range b.N {
		br := newBroker(b, true)
		c, _ := benchService(b, br, nil)
		best := 0.0
		var runs []offerResult
		for _, clients := range []int{16, 256} {
			capacity := offerOrders(b, c.url, 0, clients, d)
			best = max(best, capacity.goodput)
			b.ReportMetric(capacity.goodput, fmt.Sprintf("capacity_%d_orders/s", clients))
			fmt.Printf("%s capacity, closed loop of %d clients: %.0f orders/s, 201 p99 %.1f ms\n", b.Name(), clients, capacity.goodput, ms(capacity.p99))
			for _, factor := range []float64{1.5, 3} {
				r := offerOrders(b, c.url, factor*capacity.goodput, 4000, d)
				r.name = fmt.Sprintf("%sx_%d", strconv.FormatFloat(factor, 'f', -1, 64), clients)
				runs = append(runs, r)
				best = max(best, r.goodput)
			}
		}
		for _, r := range runs {
			fmt.Printf("%s offer %s (%.0f/s, sent %.0f/s): %.0f 201/s (%.2f of the best), 503 %d, other %d, client timeouts %d, 201 p50 %.1f ms p99 %.1f ms, slowest answer %.0f ms\n",
				b.Name(), r.name, r.offered, r.sent, r.goodput, r.goodput/best, r.unavailable, r.other, r.timeouts, ms(r.p50), ms(r.p99), ms(r.slowest))
			b.ReportMetric(r.goodput/best, "goodput_ratio_"+r.name)
			b.ReportMetric(float64(r.unavailable), "503_"+r.name)
			b.ReportMetric(float64(r.timeouts), "client_timeouts_"+r.name)
			b.ReportMetric(ms(r.p99), "p99_ms_"+r.name)
			if r.other > 0 {
				b.Errorf("offer %s: %d answers neither 201 nor 503", r.name, r.other)
			}
		}
	}
}

// offerResult is what one offer of orders got.
type offerResult struct {
	name                         string
	offered, sent, goodput       float64
	unavailable, other, timeouts int
	p50, p99, slowest            time.Duration
}

// offerOrders posts orders to baseURL for d: at rate a second, open-loop, from
// at most clients at once; or, with rate 0, in a closed loop from clients.
// Each client is one keep-alive connection that writes a request made once
// and reads the status line and headers of the answer (rawClient): the load
// costs the machine a few microseconds a request, where net/http's client,
// at twenty thousand requests a second, took most of a core from the service.
func offerOrders(b *testing.B, baseURL string, rate float64, clients int, d time.Duration) offerResult {
	b.Helper()
	addr := strings.TrimPrefix(baseURL, "http://")
	body := `{"amount": 1500}`
	req := []byte("POST /orders HTTP/1.1\r\nHost: " + addr + "\r\nX-User-Id: overload\r\nContent-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	var mu sync.Mutex
	var r offerResult
	var lat []time.Duration
	tally := func(due time.Time, status int, retryAfter bool, err error) {
		took := time.Since(due)
		mu.Lock()
		defer mu.Unlock()
		r.slowest = max(r.slowest, took)
		switch {
		case err != nil:
			r.timeouts++
		case status == http.StatusCreated:
			lat = append(lat, took)
		case status == http.StatusServiceUnavailable && retryAfter:
			r.unavailable++
		default:
			r.other++
		}
	}
	start := time.Now()
	end := start.Add(d)
	var wg sync.WaitGroup
	var sent atomic.Int64
	client := func(next func() (time.Time, bool)) {
		var c *rawClient
		for {
			due, ok := next()
			if !ok {
				break
			}
			if c == nil {
				var err error
				if c, err = dialRaw(addr); err != nil {
					tally(due, 0, false, err)
					continue
				}
			}
			sent.Add(1)
			status, retryAfter, err := c.do(req, due.Add(5*time.Second))
			tally(due, status, retryAfter, err)
			if err != nil {
				c.close()
				c = nil
			}
		}
		if c != nil {
			c.close()
		}
	}
	if rate == 0 {
		for range clients {
			wg.Go(func() {
				client(func() (time.Time, bool) { now := time.Now(); return now, now.Before(end) })
			})
		}
	} else {
		due := make(chan time.Time, clients)
		for range clients {
			wg.Go(func() {
				client(func() (time.Time, bool) { t, ok := <-due; return t, ok })
			})
		}
		every := time.Duration(float64(time.Second) / rate)
		for t := start; t.Before(end); t = t.Add(every) {
			time.Sleep(time.Until(t))
			due <- t
		}
		close(due)
	}
	// Should the offer have fallen behind its schedule, the rates are over
	// the time it took to make it.
	took := max(d, time.Since(start))
	wg.Wait()
	slices.Sort(lat)
	r.offered, r.sent = rate, float64(sent.Load())/took.Seconds()
	r.goodput = float64(len(lat)) / took.Seconds()
	if len(lat) > 0 {
		r.p50, r.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
	return r
}

// rawClient is one HTTP/1.1 keep-alive connection that sends a request given
// as bytes and reads no more of the answer than a benchmark needs.
type rawClient struct {
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(addr string) (*rawClient, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &rawClient{conn: conn, r: bufio.NewReaderSize(conn, 4096)}, nil
}

func (c *rawClient) close() { c.conn.Close() }

// do writes req and reads the answer's status, whether it has a Retry-After,
// and its body (by Content-Length), all by deadline.
func (c *rawClient) do(req []byte, deadline time.Time) (status int, retryAfter bool, err error) {
	c.conn.SetDeadline(deadline) //nolint:errcheck // a closed connection fails the write below
	if _, err := c.conn.Write(req); err != nil {
		return 0, false, err
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 {
		return 0, false, fmt.Errorf("status line %q", line)
	}
	status, _ = strconv.Atoi(string(line[9:12]))
	length := 0
	for {
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		h := strings.ToLower(strings.TrimSpace(string(line)))
		if h == "" {
			break
		}
		if v, ok := strings.CutPrefix(h, "content-length:"); ok {
			length, _ = strconv.Atoi(strings.TrimSpace(v))
		}
		retryAfter = retryAfter || strings.HasPrefix(h, "retry-after:")
	}
	_, err = c.r.Discard(length)
	return status, retryAfter, err
}

// BenchmarkGroupSession: what the consumer group's session (KAFKA_SESSION_TIMEOUT)
// costs and saves, for each session of BENCH_GROUP_SESSIONS (10s and 45s by
// default): two replicas, one SIGKILLed while orders come to the other, and the
// seconds until the survivor applied a result on each partition
// (replicaCrashRecovery); then, for each pause of BENCH_GROUP_PAUSES (5s and
// 15s), one replica SIGSTOPped that long and resumed, with a result written
// for 30 orders as it stops: the seconds until all were applied, and the
// partitions the paused one lost (its session ended) and was assigned back.
// Run it against the broker whose behaviour is wanted: KAFKA_BROKERS.
func BenchmarkGroupSession(b *testing.B) {
	durations := func(key, def string) []time.Duration {
		var ds []time.Duration
		for _, v := range strings.Split(cmp.Or(os.Getenv(key), def), ",") {
			d, err := time.ParseDuration(strings.TrimSpace(v))
			if err != nil {
				b.Fatalf("%s: %v", key, err)
			}
			ds = append(ds, d)
		}
		return ds
	}
	for _, session := range durations("BENCH_GROUP_SESSIONS", "10s,45s") {
		env := map[string]string{"KAFKA_SESSION_TIMEOUT": session.String()}
		b.Run("session_"+session.String(), func(b *testing.B) {
			for range b.N {
				inForce, took := replicaCrashRecovery(b, newBroker(b, false), env)
				fmt.Printf("%s: session in force %s; a replica SIGKILLed: every result applied %.1f s after\n", b.Name(), inForce, took.Seconds())
				b.ReportMetric(took.Seconds(), "s_after_kill")
				for _, pause := range durations("BENCH_GROUP_PAUSES", "5s,15s") {
					took, lost := replicaPause(b, newBroker(b, false), env, pause)
					fmt.Printf("%s: a replica paused %s: every result applied %.1f s after the pause began; %d partitions lost and %d assigned back\n",
						b.Name(), pause, took.Seconds(), lost, lost)
					b.ReportMetric(took.Seconds(), "s_pause_"+pause.String())
					b.ReportMetric(float64(lost), "lost_pause_"+pause.String())
				}
			}
		})
	}
}

// replicaPause starts two replicas, SIGSTOPs one for pause, writes a result for
// 30 orders as it stops, and returns how long after the stop the last was
// applied and how many partitions the stopped one lost meanwhile.
func replicaPause(b *testing.B, br *broker, extra map[string]string, pause time.Duration) (took time.Duration, lost int) {
	b.Helper()
	dbURL, a, c := twoReplicas(b, br, extra)
	user := newUser()
	var ids []string
	for range 30 {
		ids = append(ids, do(b, "POST", a.url+"/orders", `{"amount": 5}`, "X-User-Id", user).order(b).ID)
	}
	lostBefore := metric(b, c.url, `payment_results_partition_changes_total{change="lost"}`)
	if err := c.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		b.Fatal(err)
	}
	stopped := time.Now()
	producePaid(b, br, ids...)
	resumed := false
	waitFor(b, pause+120*time.Second, "every result applied", func() bool {
		if !resumed && time.Since(stopped) >= pause {
			if err := c.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				b.Fatal(err)
			}
			resumed = true
		}
		if count(b, dbURL, `SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'PAID'`, ids) < len(ids) {
			return false
		}
		if took == 0 {
			took = time.Since(stopped)
		}
		return resumed
	})
	waitOwning(b, a.url, c.url)
	return took, int(metric(b, c.url, `payment_results_partition_changes_total{change="lost"}`) - lostBefore)
}

// BenchmarkGroupStability: two replicas with the service's defaults, 100
// orders a second, each paid by the demo Payment Service, for
// BENCH_STABILITY (10 minutes by default) with no fault: the partitions
// each replica was assigned, had revoked and lost over the run. The group's
// first assignment is counted before the run; a session that ended for
// nothing would show as partitions lost.
func BenchmarkGroupStability(b *testing.B) {
	d := 10 * time.Minute
	if v := os.Getenv("BENCH_STABILITY"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			b.Fatalf("BENCH_STABILITY: %v", err)
		}
	}
	for range b.N {
		br := newBroker(b, false)
		dbURL := newSchema(b)
		var replicas []*child
		for range 2 {
			env := childEnvFor(dbURL, br)
			env["DEMO_PAYMENTS"] = "true"
			env["LOG_LEVEL"] = "warn"
			delete(env, "KAFKA_SESSION_TIMEOUT") // the service's default
			c := startChild(b, env)
			c.waitReady(b)
			replicas = append(replicas, c)
		}
		waitOwning(b, replicas[0].url, replicas[1].url)
		changes := func() (sum [3]float64) {
			for _, c := range replicas {
				for i, kind := range partitionChangeKinds {
					sum[i] += metric(b, c.url, `payment_results_partition_changes_total{change="`+kind+`"}`)
				}
			}
			return sum
		}
		before := changes()
		tick := time.NewTicker(10 * time.Millisecond) // 100 a second
		for end := time.Now().Add(d); time.Now().Before(end); {
			<-tick.C
			do(b, "POST", replicas[0].url+"/orders", `{"amount": 5}`, "X-User-Id", "stability")
		}
		tick.Stop()
		after := changes()
		paid := count(b, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`)
		fmt.Printf("%s: %s, %d orders paid; partitions assigned %v, revoked %v, lost %v over the run (first assignment: %v)\n",
			b.Name(), d, paid, after[0]-before[0], after[1]-before[1], after[2]-before[2], before[0])
		for i, kind := range partitionChangeKinds {
			b.ReportMetric(after[i]-before[i], "partitions_"+kind)
		}
	}
}
