package main

// The service's promise under faults: a committed order is announced on
// pay-order at least once, and a payment result is applied exactly once,
// whatever fails. Each test breaks one thing and asserts on rows and records.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// child is the service running as a separate process (this test binary,
// re-executed), so a test can SIGKILL or SIGTERM it.
type child struct {
	cmd    *exec.Cmd
	url    string
	out    *logBuffer
	stderr *logBuffer
	done   chan struct{}
	err    error
}

// startChild starts the service with env (HTTP_ADDR must name a port).
func startChild(t testing.TB, env map[string]string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// The race detector sleeps a second at exit unless told not to; the
	// shutdown tests time the exit.
	cmd.Env = append(os.Environ(), childEnv+"=1", "GORACE=atexit_sleep_ms=0")
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	c := &child{cmd: cmd, url: "http://" + env["HTTP_ADDR"], out: &logBuffer{}, stderr: &logBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = c.out, c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-c.done
		if t.Failed() {
			t.Logf("child logs:\n%s%s", c.out, c.stderr)
		}
	})
	return c
}

func (c *child) waitReady(t testing.TB) {
	t.Helper()
	waitFor(t, 20*time.Second, "child /healthz", func() bool {
		select {
		case <-c.done:
			t.Fatalf("child exited during start: %v\n%s%s", c.err, c.out, c.stderr)
		default:
		}
		resp, err := http.Get(c.url + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (c *child) kill(t testing.TB) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill child: %v", err)
	}
	<-c.done
}

// sigterm sends SIGTERM and waits for the exit, failing the test if none
// comes within wait; it returns how long the exit took.
func (c *child) sigterm(t testing.TB, wait time.Duration) time.Duration {
	t.Helper()
	signalled := time.Now()
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.done:
	case <-time.After(wait):
		t.Fatalf("still running %s after SIGTERM", wait)
	}
	return time.Since(signalled)
}

func childEnvFor(dbURL string, b *broker) map[string]string {
	env := serviceEnv(dbURL, b)
	env["HTTP_ADDR"] = "127.0.0.1:" + freePort()
	return env
}

func freePort() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// metric reads one sample of the service's /metrics.
func metric(t testing.TB, baseURL, sample string) float64 {
	t.Helper()
	r := do(t, "GET", baseURL+"/metrics", "")
	for _, line := range strings.Split(string(r.body), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no sample %s in /metrics:\n%s", sample, r.body)
	return 0
}

// 1. Crash under load.

// SIGKILL under load loses no event: every order answered 201 has its pay-
// order event once the service restarts (duplicates are counted and logged).
func TestCrashUnderLoadLosesNoEvent(t *testing.T) {
	b := newBroker(t, true) // the broker lives in this process and outlives the child
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	env["RELAY_BATCH_SIZE"] = "20" // many batches in flight when the kill lands
	c := startChild(t, env)
	c.waitReady(t)

	const total = 500
	user := newUser()
	var created, refused atomic.Int32
	var ackedMu sync.Mutex
	var acked []string // ids answered 201
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second}
	for range 8 {
		wg.Go(func() {
			for created.Load() < total {
				req, _ := http.NewRequest("POST", c.url+"/orders", strings.NewReader(`{"amount": 300}`))
				req.Header.Set("X-User-Id", user)
				resp, err := client.Do(req)
				if err != nil {
					refused.Add(1) // the service is down: wait for it to come back
					time.Sleep(20 * time.Millisecond)
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusCreated {
					var o Order
					if err := json.Unmarshal(body, &o); err != nil {
						t.Errorf("201 body %s: %v", body, err)
					}
					ackedMu.Lock()
					acked = append(acked, o.ID)
					ackedMu.Unlock()
					created.Add(1)
				}
			}
		})
	}
	waitFor(t, 60*time.Second, "half the orders created", func() bool { return created.Load() >= total/2 })
	// The kill lands while the relay holds claimed rows: its produce is
	// stalled, so nothing it claimed can have been marked published.
	release := swallow(b, kmsg.Produce)
	waitClaimed(t, dbURL)
	c.kill(t)
	release()
	t.Logf("SIGKILL after %d orders created, with the relay holding claimed rows", created.Load())
	c2 := startChild(t, env)
	c2.waitReady(t)
	wg.Wait()

	ids := orderIDs(t, dbURL)
	stored := map[string]bool{}
	for _, id := range ids {
		stored[id] = true
	}
	for _, id := range acked {
		if !stored[id] {
			t.Errorf("order %s was answered 201 but is not stored", id)
		}
	}
	if len(acked) < total {
		t.Fatalf("%d orders acknowledged, want at least %d", len(acked), total)
	}
	recs := readPayOrders(t, b, ids, 60*time.Second)
	perEvent := map[string]int{}
	eventOf := map[string]string{}
	for _, r := range recs {
		perEvent[r.EventID]++
		if e, ok := eventOf[r.OrderID]; ok && e != r.EventID {
			t.Errorf("order %s announced by two different events %s and %s", r.OrderID, e, r.EventID)
		}
		eventOf[r.OrderID] = r.EventID
	}
	dups := 0
	for _, n := range perEvent {
		dups += n - 1
	}
	t.Logf("crash under load: %d orders stored, %d acknowledged (%d requests refused while down), %d pay-order records, %d duplicates (same event_id)",
		len(ids), len(acked), refused.Load(), len(recs), dups)
	for _, id := range acked {
		if eventOf[id] == "" {
			t.Errorf("acknowledged order %s never announced", id)
		}
	}
	if len(eventOf) != len(ids) {
		t.Errorf("%d of %d orders announced", len(eventOf), len(ids))
	}
}

func orderIDs(t testing.TB, dbURL string) []string {
	t.Helper()
	rows, err := schemaPool(t, dbURL).Query(context.Background(), `SELECT id::text FROM orders`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

// SIGKILL between applying a payment result and committing its offset: the
// redelivered result changes nothing.
func TestCrashBetweenApplyAndOffsetCommitChangesNothing(t *testing.T) {
	b := newBroker(t, true)
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	c := startChild(t, env)
	c.waitReady(t)
	user := newUser()
	o := do(t, "POST", c.url+"/orders", `{"amount": 10}`, "X-User-Id", user).order(t)

	// The broker refuses every offset commit: the result is applied but its
	// offset can never be committed before the kill.
	var blockCommits atomic.Bool
	blockCommits.Store(true)
	b.cluster.ControlKey(kmsg.OffsetCommit.Int16(), func(kmsg.Request) (kmsg.Response, error, bool) {
		if !blockCommits.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return nil, errors.New("offset commits blocked by the test"), true
	})
	produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`)
	var applied Order
	waitFor(t, 15*time.Second, "result applied", func() bool {
		applied = do(t, "GET", c.url+"/orders/"+o.ID, "", "X-User-Id", user).order(t)
		return applied.Status == "PAID"
	})
	c.kill(t)
	if committedAt(t, b) != 0 {
		t.Fatalf("offset committed despite the block: the precondition of this test failed")
	}

	blockCommits.Store(false)
	c2 := startChild(t, env)
	c2.waitReady(t)
	// The killed member's partitions are reassigned after its session
	// timeout; then the record is delivered again, and acknowledged.
	waitFor(t, 30*time.Second, "the redelivered result seen", func() bool {
		return metric(t, c2.url, "payment_results_ignored_total") > 0
	})
	waitCommitted(t, b)
	if got := metric(t, c2.url, "payment_results_ignored_total"); got != 1 {
		t.Errorf("restarted consumer ignored %v results, want the 1 redelivered", got)
	}
	after := do(t, "GET", c2.url+"/orders/"+o.ID, "", "X-User-Id", user).order(t)
	if after.Status != "PAID" || !after.UpdatedAt.Equal(applied.UpdatedAt) {
		t.Errorf("redelivery changed the order: %+v, was %+v", after, applied)
	}
}

// committedAt sums the group's committed offsets on payment-results.
func committedAt(t testing.TB, b *broker) int64 {
	t.Helper()
	adm, closeAdm := adminClient(t, b)
	defer closeAdm()
	offs, err := adm.FetchOffsets(context.Background(), b.topic(consumerGroup))
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	offs.Each(func(o kadm.OffsetResponse) {
		if o.Topic == b.topic(topicPaymentResults) && o.At > 0 {
			sum += o.At
		}
	})
	return sum
}

// 2. Broker outage.

// startWithBrokerFaults starts the service on a broker the test can cut or
// stall, with a 1s produce deadline, and returns once the relay has published
// a first order (so it has talked to the broker).
func startWithBrokerFaults(t *testing.T) (*broker, string, *service, string) {
	t.Helper()
	b := newBroker(t, true)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["RELAY_PRODUCE_TIMEOUT"] = "1s"
	s := startService(t, env)
	user := newUser()
	readPayOrders(t, b, []string{s.createOrder(t, user, 1).ID}, 10*time.Second)
	return b, dbURL, s, user
}

// createPromptly creates n orders and wants each answered within 1s, whatever
// Kafka is doing: the outbox, not the broker, is on a request's path.
func createPromptly(t *testing.T, s *service, user string, n int, while string) []string {
	t.Helper()
	var ids []string
	for range n {
		start := time.Now()
		ids = append(ids, s.createOrder(t, user, 2).ID)
		if d := time.Since(start); d > time.Second {
			t.Errorf("POST took %s %s", d, while)
		}
	}
	return ids
}

func waitDrained(t *testing.T, dbURL string) {
	t.Helper()
	waitFor(t, 10*time.Second, "outbox drained", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
}

// With the broker down, POST /orders still answers 201 at once and /readyz
// 503; every event is published within seconds of the broker's return.
func TestBrokerOutageOrdersAreKeptAndPublishedOnReturn(t *testing.T) {
	b, dbURL, s, user := startWithBrokerFaults(t)
	b.gate.setDown(true)

	ids := createPromptly(t, s, user, 50, "while the broker was down")
	waitFor(t, 10*time.Second, "/readyz 503 while the broker is down", func() bool {
		return do(t, "GET", s.url+"/readyz", "").status == http.StatusServiceUnavailable
	})
	if n := count(t, dbURL, `SELECT count(*) FROM outbox`); n != 50 {
		t.Errorf("unpublished outbox rows during the outage: %d, want 50", n)
	}

	b.gate.setDown(false)
	returned := time.Now()
	recs := readPayOrders(t, b, ids, 15*time.Second)
	t.Logf("all 50 events on pay-order %s after the broker returned (%d records)", time.Since(returned).Round(time.Millisecond), len(recs))
	waitDrained(t, dbURL)
	waitFor(t, 10*time.Second, "/readyz 200 after the broker returned", func() bool {
		return do(t, "GET", s.url+"/readyz", "").status == http.StatusOK
	})
}

// A broker that accepts produce requests and never answers holds no
// transaction open: the relay claims its rows for a lease and commits at once,
// so vacuum's horizon (the oldest backend_xmin) never waits for the broker,
// however long the outage. Orders keep coming meanwhile. The claim is released
// after RELAY_PRODUCE_TIMEOUT, and the events go out once the broker answers.
// OUTAGE (a duration, 12s by default) sets how long the broker stays silent.
func TestBrokerOutageHoldsNoTransactionOpen(t *testing.T) {
	outage := 12 * time.Second
	if v := os.Getenv("OUTAGE"); v != "" {
		var err error
		if outage, err = time.ParseDuration(v); err != nil {
			t.Fatalf("OUTAGE: %v", err)
		}
	}
	b := newBroker(t, true)
	dbURL := withParam(newSchema(t), "application_name", "order-service-under-test")
	env := serviceEnv(dbURL, b)
	env["RELAY_PRODUCE_TIMEOUT"] = "5s"
	s := startService(t, env)
	user := newUser()
	readPayOrders(t, b, []string{s.createOrder(t, user, 1).ID}, 10*time.Second)

	var stalled atomic.Bool
	stalled.Store(true)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(kmsg.Request) (kmsg.Response, error, bool) {
		if !stalled.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return nil, nil, true // no answer, ever
	})
	o := s.createOrder(t, user, 2)
	waitFor(t, 5*time.Second, "the relay to claim the row", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = $1 AND lease_until > now()`, o.ID) == 1
	})
	db := schemaPool(t, dbURL)
	var longest time.Duration
	var oldestXmin int
	ids := []string{o.ID}
	for end := time.Now().Add(outage); time.Now().Before(end); {
		ids = append(ids, s.createOrder(t, user, 3).ID)
		var xact float64
		var xmin int
		if err := db.QueryRow(context.Background(), `
			SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8,
			       coalesce(max(age(backend_xmin)), 0)
			FROM pg_stat_activity
			WHERE application_name = 'order-service-under-test' AND xact_start IS NOT NULL`).Scan(&xact, &xmin); err != nil {
			t.Fatal(err)
		}
		longest = max(longest, time.Duration(xact*float64(time.Second)))
		oldestXmin = max(oldestXmin, xmin)
		time.Sleep(50 * time.Millisecond) // a sampling period, not a wait for a condition
	}
	t.Logf("broker silent %s, %d orders meanwhile: the service's longest transaction %s, largest age(backend_xmin) %d",
		outage, len(ids)-1, longest.Round(time.Millisecond), oldestXmin)
	// Each is one statement; the produce deadline (5s) is what a
	// transaction open across the broker call would last.
	if longest > 2*time.Second {
		t.Errorf("a transaction of the service stayed open %s while the broker was silent, want under 2s", longest)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = $1`, o.ID); n != 1 {
		t.Error("the event left the outbox while the broker never answered")
	}
	if oldestXmin > 50 {
		t.Errorf("age(backend_xmin) reached %d transactions while the broker was silent: vacuum's horizon was held back", oldestXmin)
	}

	stalled.Store(false)
	readPayOrders(t, b, ids, 30*time.Second)
	waitDrained(t, dbURL)
}

// A broker that answers every ping but takes no write (each produce refused
// with a retriable error) drives the relay deep into its backoff without ever
// looking down. The moment it takes writes again, the first event leaves
// within 1s, not after the backoff: a failed produce is itself the sign that
// the broker was down (the same holds when a whole cluster returns just as a
// produce gives up, seen against Apache Kafka in the cluster tests).
func TestRelayPublishesSoonAfterBrokerTakesWritesAgain(t *testing.T) {
	b, dbURL, s, user := startWithBrokerFaults(t)
	var refusing atomic.Bool
	refusing.Store(true)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		if !refusing.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return refuseProduce(req.(*kmsg.ProduceRequest), kerr.NotEnoughReplicas), nil, true
	})
	o := s.createOrder(t, user, 2)
	retryIn := regexp.MustCompile(`relay: publish failed.* retry_in=(\S+)`)
	waitFor(t, 30*time.Second, "a relay backoff of 1.5s or more", func() bool {
		for _, m := range retryIn.FindAllStringSubmatch(s.logs.String(), -1) {
			if d, err := time.ParseDuration(m[1]); err == nil && d >= 1500*time.Millisecond {
				return true
			}
		}
		return false
	})
	gone := watchDeleted(t, dbURL, o.ID)
	refusing.Store(false)
	accepting := time.Now()
	readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	published := gone()
	d := published.Sub(accepting)
	t.Logf("published %s after the broker took writes again, the relay in a backoff of 1.5s or more", d.Round(time.Millisecond))
	if d > time.Second {
		t.Errorf("published %s after the broker took writes again, want within 1s", d.Round(time.Millisecond))
	}
}

// A partition that takes no write does not hold back the events of the other
// partitions: the relay marks what the broker acknowledged and leaves the
// rest for the next try. (Against a 3-node cluster this is a killed leader:
// its partitions wait for a new one, the others go on.)
func TestRelayPublishesThePartitionsThatTakeWrites(t *testing.T) {
	b, dbURL, s, user := startWithBrokerFaults(t)
	const (
		normal = iota
		refuseAll
		refusePartition0 // the others acknowledged (and not stored: the test reads the outbox)
	)
	var mode atomic.Int32
	mode.Store(refuseAll)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		m := mode.Load()
		if m == normal {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		resp := refuseProduce(req.(*kmsg.ProduceRequest), kerr.NotEnoughReplicas)
		for i := range resp.Topics {
			for j := range resp.Topics[i].Partitions {
				if p := &resp.Topics[i].Partitions[j]; m == refusePartition0 && p.Partition != 0 {
					p.ErrorCode = 0
				}
			}
		}
		return resp, nil, true
	})
	// Thirty orders wait in the outbox, so that every claim holds records
	// of every partition.
	var ids []string
	for range 30 {
		ids = append(ids, s.createOrder(t, user, 2).ID)
	}
	published := func() int { // the outbox deletes a row once its event is published
		return len(ids) - count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = ANY($1)`, ids)
	}
	if n := published(); n != 0 {
		t.Fatalf("%d events published while every write was refused", n)
	}
	// One try of all thirty has failed: from now on each claim holds them all.
	waitFor(t, 10*time.Second, "a failed try of all 30 records", func() bool {
		return strings.Contains(s.logs.String(), "of 30 records")
	})
	mode.Store(refusePartition0)
	waitFor(t, 10*time.Second, "the events of partitions 1 and 2 published while partition 0 refuses", func() bool { return published() > 0 })
	if n := published(); n == len(ids) {
		t.Errorf("all %d events published while partition 0 refused every write", n)
	}
	mode.Store(normal)
	waitDrained(t, dbURL)
}

// An event is stamped published when the broker acknowledged its record, not
// when its batch ended: a batch ends with its slowest partition, which may
// retry for the whole produce deadline while the others were written at once.
// The same moment is what order_publish_latency_seconds observes.
func TestPublishLatencyIsEachRecordsAcknowledgement(t *testing.T) {
	b := newBroker(t, true)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b)) // the 10s produce deadline
	var (
		acked    atomic.Int64 // records of partitions 1 and 2, acknowledged (not stored) in the first request
		ackedAt  atomic.Int64 // when, in Unix microseconds
		refusals atomic.Int32 // of partition 0 since then
		holding  atomic.Bool
	)
	holding.Store(true)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		if !holding.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		pr := req.(*kmsg.ProduceRequest)
		resp := refuseProduce(pr, kerr.NotEnoughReplicas)
		for i, rt := range pr.Topics {
			for j, rp := range rt.Partitions {
				if rp.Partition == 0 {
					refusals.Add(1)
					continue
				}
				var batch kmsg.RecordBatch
				if err := batch.ReadFrom(rp.Records); err != nil {
					t.Errorf("record batch of partition %d: %v", rp.Partition, err)
				}
				acked.Add(int64(batch.NumRecords))
				resp.Topics[i].Partitions[j].ErrorCode = 0
			}
		}
		if ackedAt.Load() == 0 && acked.Load() > 0 {
			refusals.Store(0)
			ackedAt.Store(time.Now().UnixMicro())
		}
		return resp, nil, true
	})
	// Thirty events in one commit, so that the first claim holds them all.
	const events = 30
	insertEvents(t, dbURL, b.topic(topicPayOrder), events)
	// kgo retries partition 0 after 50ms, 100ms, 200ms, 250ms, ...: four
	// refusals after the others' acknowledgement put 600ms or more between
	// the two.
	waitFor(t, 10*time.Second, "partition 0 refused four times after the others were acknowledged", func() bool {
		return ackedAt.Load() != 0 && refusals.Load() >= 4
	})
	var created time.Time
	if err := schemaPool(t, dbURL).QueryRow(context.Background(), `SELECT max(created_at) FROM outbox`).Scan(&created); err != nil {
		t.Fatal(err)
	}
	holding.Store(false)
	released := time.Now()
	waitDrained(t, dbURL)

	first := time.UnixMicro(ackedAt.Load())
	t.Logf("%d events acknowledged %s after their commit, %s before partition 0 took its %d",
		acked.Load(), first.Sub(created).Round(time.Millisecond), released.Sub(first).Round(time.Millisecond), events-acked.Load())
	if acked.Load() == 0 || acked.Load() == events {
		t.Fatalf("%d of %d records in partitions 1 and 2: the test needs both kinds", acked.Load(), events)
	}
	if d := first.Sub(created); d > 400*time.Millisecond {
		t.Fatalf("the first acknowledgement came %s after the commit: too late to tell it from partition 0's", d)
	}
	// Each record's latency is its own acknowledgement: those acknowledged
	// at once fall within 0.5s, partition 0's after it. Observed at the
	// batch's end, all thirty would fall after.
	if n := metric(t, s.url, "order_publish_latency_seconds_count"); n != events {
		t.Errorf("order_publish_latency_seconds_count %v, want %d", n, events)
	}
	if n := metric(t, s.url, `order_publish_latency_seconds_bucket{le="0.5"}`); n != float64(acked.Load()) {
		t.Errorf("%v publish latencies within 0.5s, want the %d acknowledged before partition 0 took writes", n, acked.Load())
	}
}

// While a backlog lasts, the relay's other workers claim batches beside the
// first; when the broker refuses, each stops at its failure and leaves the
// retrying to the first worker and its backoff. Workers that retried on
// their own would claim and fail batch after batch, as fast as the broker
// answers.
func TestRelayRetriesWithOneWorkerWhenTheBrokerRefuses(t *testing.T) {
	b := newBroker(t, true)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["RELAY_WORKERS"] = "4"
	env["RELAY_BATCH_SIZE"] = "10"
	env["RELAY_POLL_INTERVAL"] = "1h"
	s := startService(t, env)

	// The first 30 produce requests pass, which sets every worker to work
	// on the backlog; every later one is refused at once, for good.
	var passed atomic.Int32
	var refusing atomic.Bool
	refusing.Store(true)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		if !refusing.Load() || passed.Add(1) <= 30 {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return refuseProduce(req.(*kmsg.ProduceRequest), kerr.InvalidRecord), nil, true
	})
	const backlog = 5000
	insertEvents(t, dbURL, b.topic(topicPayOrder), backlog)

	// The first worker backs off 100ms after its first failure, doubling
	// each time; the others stop after theirs, or after one more try if a
	// batch that the broker took just before asked them back. From the
	// first worker's third failure to its fifth (0.3s to 1.5s after the
	// refusals began) no one else tries.
	retries := func() int { return strings.Count(s.logs.String(), "relay: publish failed, retrying") }
	waitFor(t, 15*time.Second, "the first worker's third failure", func() bool { return retries() >= 3 })
	third := metric(t, s.url, "outbox_publish_errors_total")
	waitFor(t, 15*time.Second, "the first worker's fifth failure", func() bool { return retries() >= 5 })
	fifth := metric(t, s.url, "outbox_publish_errors_total")
	published := metric(t, s.url, "outbox_events_published_total")
	t.Logf("%v events published; %v failed batches by the first worker's third failure, %v by its fifth", published, third, fifth)
	if published == 0 || published == backlog {
		t.Fatalf("%v of %d events published before the broker refused: the workers were not draining", published, backlog)
	}
	if fifth-third != 2 {
		t.Errorf("%v failed batches from the first worker's third failure to its fifth, want its own 2", fifth-third)
	}

	refusing.Store(false)
	waitDrained(t, dbURL)
}

// insertEvents commits n events for topic (keys "1" to "n") in one statement
// and wakes the relay: a backlog that appears at once, as after an outage.
func insertEvents(t testing.TB, dbURL, topic string, n int) {
	t.Helper()
	if _, err := schemaPool(t, dbURL).Exec(context.Background(), `
		WITH e AS (
		    INSERT INTO outbox (topic, key, event_id, payload)
		    SELECT $1, g::text, gen_random_uuid(), '{}' FROM generate_series(1, $2::int) AS g
		)
		SELECT pg_notify($3, '')`, topic, n, outboxChannel); err != nil {
		t.Fatal(err)
	}
}

// refuseProduce answers every partition of req with code.
func refuseProduce(req *kmsg.ProduceRequest, code *kerr.Error) *kmsg.ProduceResponse {
	resp := req.ResponseKind().(*kmsg.ProduceResponse)
	for _, rt := range req.Topics {
		st := kmsg.NewProduceResponseTopic()
		st.Topic, st.TopicID = rt.Topic, rt.TopicID // v13 names topics by id
		for _, rp := range rt.Partitions {
			sp := kmsg.NewProduceResponseTopicPartition()
			sp.Partition = rp.Partition
			sp.ErrorCode = code.Code
			st.Partitions = append(st.Partitions, sp)
		}
		resp.Topics = append(resp.Topics, st)
	}
	return resp
}

// 3. Database outage.

// tcpProxy stands between the service and PostgreSQL. Cut, it drops every
// connection and then accepts new ones without ever answering: the worst
// case, where only timeouts can save the caller.
type tcpProxy struct {
	pipeFn func(net.Conn) // how a connection is forwarded; nil: pipe
	ln     net.Listener
	target func() (net.Conn, error)
	mu     sync.Mutex
	down   bool
	hung   bool
	conns  map[net.Conn]bool
}

func newDBProxy(t testing.TB, schema string) (*tcpProxy, string) {
	t.Helper()
	cc := testDB.Config().ConnConfig
	network, addr := "tcp", net.JoinHostPort(cc.Host, strconv.Itoa(int(cc.Port)))
	if strings.HasPrefix(cc.Host, "/") {
		network, addr = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cc.Host, cc.Port)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{ln: ln, conns: map[net.Conn]bool{},
		target: func() (net.Conn, error) { return net.Dial(network, addr) }}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.set(false)
	})
	u := url.URL{Scheme: "postgres", User: url.UserPassword(cc.User, cc.Password), Host: ln.Addr().String(), Path: "/" + cc.Database,
		RawQuery: url.Values{"sslmode": {"disable"}, "search_path": {schema}}.Encode()}
	if cc.Password == "" {
		u.User = url.User(cc.User)
	}
	return p, u.String()
}

func (p *tcpProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns[c] = true
		down, pipe := p.down, p.pipeFn
		p.mu.Unlock()
		if down {
			continue // held open, never answered
		}
		if pipe == nil {
			pipe = p.pipe
		}
		go pipe(c)
	}
}

// connect dials PostgreSQL for client c and tracks the connection, so that
// set can cut it; on failure it closes c.
func (p *tcpProxy) connect(c net.Conn) (net.Conn, bool) {
	up, err := p.target()
	if err != nil {
		c.Close()
		return nil, false
	}
	p.mu.Lock()
	p.conns[up] = true
	p.mu.Unlock()
	return up, true
}

func (p *tcpProxy) pipe(c net.Conn) {
	up, ok := p.connect(c)
	if !ok {
		return
	}
	go func() { p.copy(up, c); up.Close() }()
	p.copy(c, up)
	c.Close()
}

// copy forwards src to dst, holding what it reads while the proxy hangs.
func (p *tcpProxy) copy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for p.hanging() {
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *tcpProxy) hanging() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hung
}

// hang makes the database answer nothing, on the connections open (they stay
// open) and on new ones, until hang(false): a server stuck, not gone.
func (p *tcpProxy) hang(hung bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hung, p.down = hung, hung
}

// set cuts (down) or restores the database; both drop every connection.
func (p *tcpProxy) set(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// With the database down, requests get 503 problem+json within 5 s and
// goroutines do not pile up; the same process recovers by itself, relay and
// consumer included, and a storm of identical failures is logged once per
// interval with a count.
func TestDatabaseOutageAnswers503AndRecovers(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newDBProxy(t, schema)
	env := serviceEnv(dbURL, b)
	// No fallback poll: after the outage only the re-established LISTEN
	// connection can wake the relay.
	env["RELAY_POLL_INTERVAL"] = "1h"
	s := startService(t, env)
	user := newUser()
	first := s.createOrder(t, user, 1)
	readPayOrders(t, b, []string{first.ID}, 10*time.Second)
	baseline := runtime.NumGoroutine()

	proxy.set(true)
	// A payment result arriving during the outage must wait, not be lost.
	produce(t, b, b.topic(topicPaymentResults), first.ID, `{"order_id": "`+first.ID+`", "status": "PAID"}`)
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			start := time.Now()
			var r response
			switch i % 3 {
			case 0:
				r = do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", user)
			case 1:
				r = do(t, "GET", s.url+"/orders", "", "X-User-Id", user)
			default:
				r = do(t, "GET", s.url+"/orders/"+first.ID, "", "X-User-Id", user)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("request %d took %s with the database down", i, d)
			}
			if r.status != http.StatusServiceUnavailable || r.header.Get("Content-Type") != "application/problem+json" {
				t.Errorf("request %d: %d %s, want 503 problem+json", i, r.status, r.body)
			}
		})
	}
	wg.Wait()
	if r := do(t, "GET", s.url+"/readyz", ""); r.status != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the database down: %d %s", r.status, r.body)
	}
	// A storm of identical failures is logged once per interval, not once
	// per request.
	if n := strings.Count(s.logs.String(), `msg="database unavailable"`); n == 0 || n > 2 {
		t.Errorf(`%d lines "database unavailable" for 40 requests answered 503 within seconds, want 1 or 2`, n)
	}

	proxy.set(false)
	var next Order
	waitFor(t, 20*time.Second, "POST /orders 201 after the database returned", func() bool {
		r := do(t, "POST", s.url+"/orders", `{"amount": 6}`, "X-User-Id", user)
		if r.status == http.StatusCreated {
			next = r.order(t)
		}
		return r.status == http.StatusCreated
	})
	readPayOrders(t, b, []string{next.ID}, 20*time.Second) // the relay resumed
	waitFor(t, 20*time.Second, "the result sent during the outage applied", func() bool {
		return s.getOrder(t, user, first.ID).Status == "PAID"
	})
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE amount = 5`); n != 0 {
		t.Errorf("%d orders written by requests that were answered 503", n)
	}
	waitFor(t, 15*time.Second, "goroutines back to the baseline", func() bool {
		return runtime.NumGoroutine() <= baseline+20
	})
}

// startupFailure runs the service with env, which it cannot start with, and
// returns the one line it exits with (status 1) and how long it took.
func startupFailure(t *testing.T, env map[string]string) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	c := startChild(t, env)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		t.Fatal("still running 20s after a start that cannot succeed")
	}
	var exit *exec.ExitError
	if !errors.As(c.err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("exit: %v, want status 1", c.err)
	}
	lines := strings.Split(strings.TrimSpace(c.stderr.String()), "\n")
	if len(lines) != 1 {
		t.Errorf("stderr %q: want one line", c.stderr.String())
	}
	return lines[0], time.Since(start)
}

// A database unreachable at start is retried for STARTUP_TIMEOUT, then the
// process exits 1 with one line naming the address; a missing database, a
// refused role or a server older than PostgreSQL 14 exits at once.
func TestStartupExitsWithOneLineWhenDatabaseUnreachable(t *testing.T) {
	b := newBroker(t, false)
	addr := "127.0.0.1:" + freePort() // nobody listens here
	env := childEnvFor("postgres://root@"+addr+"/orders?connect_timeout=1", b)
	env["STARTUP_TIMEOUT"] = "2s"
	line, took := startupFailure(t, env)
	if !strings.Contains(line, addr) || !strings.Contains(line, "unreachable") {
		t.Errorf("exit line %q does not name %s", line, addr)
	}
	if took < 2*time.Second || took > 15*time.Second {
		t.Errorf("gave up after %s; want the 2s STARTUP_TIMEOUT plus start-up", took)
	}
}

// A database that answers "no such database" will not change its mind:
// start-up stops at once instead of waiting out STARTUP_TIMEOUT.
func TestStartupStopsAtOnceWhenDatabaseRefuses(t *testing.T) {
	b := newBroker(t, false)
	env := childEnvFor(withParam(testDBURL, "dbname", "order_service_no_such_db"), b)
	env["STARTUP_TIMEOUT"] = "60s"
	line, took := startupFailure(t, env)
	if !strings.Contains(line, "order_service_no_such_db") || !strings.Contains(line, "refused") {
		t.Errorf("exit line %q does not name the database", line)
	}
	if took > 15*time.Second {
		t.Errorf("gave up after %s; the 60s STARTUP_TIMEOUT was waited out", took)
	}
}

// Settling a commit whose answer was lost needs PostgreSQL 14 (endBackend):
// on an older server, start-up stops at once and says why, rather than
// answer 503 "outcome unknown" on the day a commit's answer is lost.
func TestStartupStopsAtOnceWhenPostgreSQLIsOlderThan14(t *testing.T) {
	b := newBroker(t, false)
	p, dbURL := newCommitProxy(t, createSchema(t))
	old := "13.16 (Debian 13.16-1.pgdg120+1)"
	p.version.Store(&old)
	env := childEnvFor(dbURL, b)
	env["STARTUP_TIMEOUT"] = "60s"
	line, took := startupFailure(t, env)
	t.Logf("exit line: %s", line)
	if !strings.Contains(line, "PostgreSQL 14 or newer") || !strings.Contains(line, "PostgreSQL 13.16") {
		t.Errorf("exit line %q does not say that 14 is needed and 13.16 found", line)
	}
	if took > 15*time.Second {
		t.Errorf("gave up after %s; the 60s STARTUP_TIMEOUT was waited out", took)
	}
}

// 4. Replicas.

// Two replicas on one database publish every event once (no duplicate) and
// apply results once across their partitions, each showing the partitions it
// owns.
func TestTwoReplicasPublishAllOnceAndApplyResultsOnce(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["RELAY_BATCH_SIZE"] = "50"
	replicas := []*service{startService(t, env), startService(t, env)}

	const total = 1000
	user := newUser()
	ids := make([]string, total)
	var next atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < total; i = int(next.Add(1)) - 1 {
				ids[i] = replicas[i%2].createOrder(t, user, int64(i+1)).ID
			}
		})
	}
	wg.Wait()

	recs := readPayOrders(t, b, ids, 60*time.Second)
	perEvent := map[string]int{}
	for _, r := range recs {
		perEvent[r.EventID]++
	}
	dups := len(recs) - len(perEvent)
	t.Logf("two replicas: %d orders, %d pay-order records, %d duplicates", total, len(recs), dups)
	if len(perEvent) != total || dups != 0 {
		t.Errorf("%d distinct events and %d duplicates for %d orders; want %d and 0", len(perEvent), dups, total, total)
	}
	published := metric(t, replicas[0].url, "outbox_events_published_total") + metric(t, replicas[1].url, "outbox_events_published_total")
	if published != total {
		t.Errorf("the relays published %v events together, want %d", published, total)
	}

	// Results for every order, each sent twice, spread over the
	// partitions by key: each is applied once, its duplicate ignored.
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var results []*kgo.Record
	for _, id := range ids {
		for range 2 {
			results = append(results, &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(id),
				Value: []byte(`{"order_id": "` + id + `", "status": "PAID"}`)})
		}
	}
	// Under KIP-848 the first replica takes every partition and gives
	// some up only once the second has joined.
	waitOwning(t, replicas[0].url, replicas[1].url)
	partitions := map[int32]bool{}
	for _, r := range cl.ProduceSync(context.Background(), results...) {
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		partitions[r.Record.Partition] = true
	}
	if len(partitions) < 2 {
		t.Fatalf("results landed on %d partition(s); the test needs them spread", len(partitions))
	}
	waitFor(t, 60*time.Second, "every order PAID", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == total
	})
	waitCommitted(t, b)
	var applied, ignored float64
	for i, s := range replicas {
		a := metric(t, s.url, `payment_results_applied_total{status="PAID"}`)
		if a == 0 {
			t.Errorf("replica %d applied no result: the test needs both consuming", i)
		}
		applied += a
		ignored += metric(t, s.url, "payment_results_ignored_total")
	}
	if applied != total || ignored != total {
		t.Errorf("replicas applied %v and ignored %v results; want %d and %d (each sent twice)", applied, ignored, total, total)
	}
}

// A relay whose broker stalls holds its claimed rows, and the other replica's
// relay publishes everything else meanwhile: SKIP LOCKED, not waiting on the
// held rows. The replicas share the database but not the broker, so that
// only one of them stalls. The other replica never polls: it learns of the
// stalled one's new orders only from its announcement (notifier.announce).
func TestStalledReplicaDoesNotHoldUpTheOther(t *testing.T) {
	bA, bB := newBroker(t, true), newBroker(t, true)
	dbURL := newSchema(t)
	envA := serviceEnv(dbURL, bA)
	envA["RELAY_PRODUCE_TIMEOUT"] = "1m"
	envA["SHUTDOWN_TIMEOUT"] = "2s" // it abandons the stalled batch at exit
	a := startService(t, envA)
	user := newUser()
	readPayOrders(t, bA, []string{a.createOrder(t, user, 1).ID}, 10*time.Second)
	release := swallow(bA, kmsg.Produce)
	defer release()
	held := a.createOrder(t, user, 2)
	waitClaimed(t, dbURL)

	// B's broker, with A's topic names: the replicas' outbox rows name
	// their topic, so both must use the same ones.
	envB := serviceEnv(dbURL, bB)
	envB["KAFKA_TOPIC_PREFIX"] = bA.prefix
	envB["RELAY_POLL_INTERVAL"] = "1h"
	bB = &broker{addrs: bB.addrs, prefix: bA.prefix, cluster: bB.cluster}
	b := startService(t, envB)
	var ids []string
	for range 20 {
		ids = append(ids, b.createOrder(t, user, 3).ID)
	}
	readPayOrders(t, bB, ids, 10*time.Second)
	fromA := a.createOrder(t, user, 4)
	readPayOrders(t, bB, []string{fromA.ID}, 5*time.Second)
	if n := count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = $1`, held.ID); n != 1 {
		t.Errorf("the stalled replica's row was published meanwhile")
	}
}

// 5. Graceful shutdown.

// SIGTERM under load: no 5xx, exit 0 within 10 s, offsets committed, so
// nothing is redelivered after a restart.
func TestGracefulShutdownUnderLoad(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	c := startChild(t, env)
	c.waitReady(t)
	user := newUser()

	// Results applied before the signal must not come back after a restart.
	var paid []string
	for range 20 {
		o := do(t, "POST", c.url+"/orders", `{"amount": 1}`, "X-User-Id", user).order(t)
		paid = append(paid, o.ID)
		produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`)
	}
	waitFor(t, 15*time.Second, "results applied", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == len(paid)
	})

	var ok, serverErrors, refused atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			client := &http.Client{Timeout: 15 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest("POST", c.url+"/orders", strings.NewReader(`{"amount": 2}`))
				req.Header.Set("X-User-Id", user)
				resp, err := client.Do(req)
				if err != nil {
					refused.Add(1) // not accepted: the listener is closed
					time.Sleep(5 * time.Millisecond)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch {
				case resp.StatusCode == http.StatusCreated:
					ok.Add(1)
				case resp.StatusCode >= 500:
					serverErrors.Add(1)
				}
			}
		})
	}
	waitFor(t, 10*time.Second, "load running", func() bool { return ok.Load() > 50 })
	took := c.sigterm(t, 15*time.Second)
	close(stop)
	wg.Wait()
	if c.err != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0", c.err)
	}
	if took > 10*time.Second {
		t.Errorf("shutdown took %s, want at most 10s", took)
	}
	if serverErrors.Load() != 0 {
		t.Errorf("%d answers were 5xx during shutdown", serverErrors.Load())
	}
	t.Logf("graceful shutdown: exit after %s; %d orders created under load, %d requests refused after close",
		took.Round(time.Millisecond), ok.Load(), refused.Load())
	if got := count(t, dbURL, `SELECT count(*) FROM orders WHERE amount = 2`); got < int(ok.Load()) {
		t.Errorf("%d orders answered 201 but only %d stored", ok.Load(), got)
	}
	// Offsets of every applied result were committed on the way out.
	if at := committedAt(t, b); at != int64(len(paid)) {
		t.Errorf("committed offsets sum to %d, want %d: applied results would be redelivered", at, len(paid))
	}

	// Everything accepted before the signal reaches pay-order after a restart.
	env["HTTP_ADDR"] = "127.0.0.1:" + freePort()
	c2 := startChild(t, env)
	c2.waitReady(t)
	readPayOrders(t, b, orderIDs(t, dbURL), 20*time.Second)
	if got := metric(t, c2.url, "payment_results_ignored_total"); got != 0 {
		t.Errorf("restarted consumer saw %v applied results again", got)
	}
}

// 6. Hostile HTTP.

// Hostile HTTP gets a clear answer and changes nothing it should not:
// oversized headers 431, a slow client cut off by the header timeout, SQL
// meta-characters stored verbatim, a bad cursor 400, unknown routes and
// methods problem+json, another user's order never visible.
func TestHostileHTTP(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))

	t.Run("huge header is 431", func(t *testing.T) {
		r := do(t, "GET", s.url+"/orders", "", "X-User-Id", "u", "X-Padding", strings.Repeat("p", 100<<10))
		if r.status != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("status %d", r.status)
		}
	})

	t.Run("slow client is cut off by the header timeout", func(t *testing.T) {
		conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprint(conn, "POST /orders HTTP/1.1\r\nHost: x\r\nX-User-Id: slow\r\n") // and never the rest
		start := time.Now()
		conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		_, err = io.ReadAll(conn)
		if d := time.Since(start); err != nil || d > 8*time.Second {
			t.Errorf("connection still open after %s (err %v); want it closed after the 5s header timeout", d, err)
		}
	})

	t.Run("SQL meta-characters are stored verbatim", func(t *testing.T) {
		user := `O'Brien"; DROP TABLE orders; --`
		desc := `'); DELETE FROM outbox; -- %_\ $1 ::text` + "\t\u00a0😀"
		body := fmt.Sprintf(`{"amount": 5, "description": %q}`, desc)
		r := do(t, "POST", s.url+"/orders", body, "X-User-Id", user)
		if r.status != http.StatusCreated {
			t.Fatalf("%d %s", r.status, r.body)
		}
		o := r.order(t)
		got := s.getOrder(t, user, o.ID)
		if got.UserID != user || got.Description != desc {
			t.Errorf("read back %q %q", got.UserID, got.Description)
		}
		if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE user_id = $1 AND description = $2`, user, desc); n != 1 {
			t.Errorf("stored row does not match byte for byte")
		}
	})

	t.Run("a cursor outside its documented format is 400; any inside it is a page", func(t *testing.T) {
		id := newUUID()
		for _, cursor := range []string{
			"9223372036854775807." + id, // beyond PostgreSQL's timestamps (22008)
			"253402300800000000." + id,  // year 10000
			"-1." + id, "+1." + id, " 1." + id, "1." + strings.ToUpper(id), "1." + id + ".", "." + id, "1.",
			base64.RawURLEncoding.EncodeToString([]byte("1." + id)), // the format before
		} {
			r := do(t, "GET", s.url+"/orders?cursor="+url.QueryEscape(cursor), "", "X-User-Id", "u")
			if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != "application/problem+json" {
				t.Errorf("cursor %q: %d %s", cursor, r.status, r.body)
			}
		}
		for _, cursor := range []string{"0." + id, "99999999999999999." + id, "00000000000000001." + id} {
			r := do(t, "GET", s.url+"/orders?cursor="+url.QueryEscape(cursor), "", "X-User-Id", "u")
			if r.status != http.StatusOK {
				t.Errorf("cursor %q: %d %s, want 200", cursor, r.status, r.body)
			}
		}
	})

	t.Run("unknown routes and wrong methods are problem+json", func(t *testing.T) {
		r := do(t, "GET", s.url+"/nowhere", "", "X-User-Id", "u")
		var p problem
		r.json(t, &p)
		if r.status != http.StatusNotFound || r.header.Get("Content-Type") != "application/problem+json" || p.Status != 404 || p.Detail == "" {
			t.Errorf("unknown route: %d %s %s", r.status, r.header.Get("Content-Type"), r.body)
		}
		r = do(t, "DELETE", s.url+"/orders", "", "X-User-Id", "u")
		r.json(t, &p)
		if r.status != http.StatusMethodNotAllowed || r.header.Get("Content-Type") != "application/problem+json" ||
			p.Status != 405 || !strings.Contains(r.header.Get("Allow"), "POST") || !strings.Contains(p.Detail, "GET") {
			t.Errorf("wrong method: %d %v %s", r.status, r.header, r.body)
		}
	})

	t.Run("another user's order is never visible", func(t *testing.T) {
		alice := newUser()
		o := s.createOrder(t, alice, 77)
		do(t, "POST", s.url+"/orders", `{"amount": 78}`, "X-User-Id", alice, "Idempotency-Key", "shared")
		for _, other := range []string{newUser(), strings.ToUpper(alice), alice + "x", "x" + alice, alice[:len(alice)-1]} {
			if r := do(t, "GET", s.url+"/orders/"+o.ID, "", "X-User-Id", other); r.status != http.StatusNotFound {
				t.Errorf("GET as %q: %d %s", other, r.status, r.body)
			}
			r := do(t, "GET", s.url+"/orders?limit=500", "", "X-User-Id", other)
			if strings.Contains(string(r.body), o.ID) {
				t.Errorf("list as %q shows alice's order", other)
			}
			r = do(t, "POST", s.url+"/orders", `{"amount": 78}`, "X-User-Id", other, "Idempotency-Key", "shared")
			if r.status != http.StatusCreated || r.order(t).UserID != other {
				t.Errorf("idempotency key of another user: %d %s", r.status, r.body)
			}
		}
	})
}

// A database down for longer than the rebalance timeout never blocks the
// group: the replica whose poll cannot be applied gives it back as soon as a
// rebalance waits for it, so a second replica that joins meanwhile gets its
// share of the partitions at once and applies the results on them, and the
// first is not dropped from the group for failing to rejoin.
func TestDatabaseOutageDoesNotBlockTheGroup(t *testing.T) {
	// Under KIP-848 a member learns of a change at its next heartbeat
	// (a fifth of the session, 1.2 s here): the first replica that it must give up a
	// partition, the second that it has one. The rebalance timeout leaves
	// room for both.
	const rebalanceTimeout = 20 * time.Second
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, proxied := newDBProxy(t, schema)
	direct := newSchemaURL(schema)
	envA := serviceEnv(proxied, b)
	envA["KAFKA_REBALANCE_TIMEOUT"] = rebalanceTimeout.String()
	a := startService(t, envA)
	user := newUser()
	var ids []string
	for range 30 { // their keys spread over the three partitions
		ids = append(ids, a.createOrder(t, user, 5).ID)
	}
	readPayOrders(t, b, ids, 10*time.Second)
	produce(t, b, b.topic(topicPaymentResults), ids[0], `{"order_id": "`+ids[0]+`", "status": "PAID"}`)
	waitFor(t, 10*time.Second, "the first replica consuming", func() bool { return a.getOrder(t, user, ids[0]).Status == "PAID" })

	proxy.set(true)
	down := time.Now()
	for _, id := range ids[1:] {
		produce(t, b, b.topic(topicPaymentResults), id, `{"order_id": "`+id+`", "status": "PAID"}`)
	}
	waitFor(t, 10*time.Second, "the first replica failing to apply its poll", func() bool {
		return strings.Contains(a.logs.String(), "consumer: apply payment results failed")
	})
	envB := serviceEnv(direct, b)
	envB["KAFKA_REBALANCE_TIMEOUT"] = rebalanceTimeout.String()
	joined := time.Now()
	b2 := startService(t, envB)
	paid := func() int { return count(t, direct, `SELECT count(*) FROM orders WHERE status = 'PAID'`) }
	waitFor(t, 2*rebalanceTimeout, "the second replica applying results", func() bool { return paid() > 1 })
	took := time.Since(joined)
	t.Logf("the second replica applied results %s after it started, the database down for the first", took.Round(time.Millisecond))
	if took > rebalanceTimeout*2/3 {
		t.Errorf("the second replica applied nothing for %s: the group waited for the first replica's poll", took.Round(time.Millisecond))
	}
	// The outage outlasts the rebalance timeout, and the first replica
	// stays a member of the group all along.
	adm, closeAdm := adminClient(t, b)
	defer closeAdm()
	for time.Since(down) < rebalanceTimeout+3*time.Second {
		if n, state := groupMembers(t, adm, b.topic(consumerGroup)); n != 2 {
			t.Fatalf("the group has %d members %s into the outage, want both replicas (state %s)",
				n, time.Since(down).Round(time.Second), state)
		}
		time.Sleep(500 * time.Millisecond) // a sampling period, not a wait for a condition
	}
	proxy.set(false)
	for deadline := time.Now().Add(30 * time.Second); paid() != len(ids); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d results applied 30s after the database returned; the first replica owns %v partitions, "+
				"the second %v; group: %s", paid(), len(ids), metric(t, a.url, "payment_results_partitions_owned"),
				metric(t, b2.url, "payment_results_partitions_owned"), groupAssignments(t, adm, b.topic(consumerGroup)))
		}
	}
}

// A replica SIGKILLed under load: the survivor applies the results of the
// dead member's partitions within the group's session in force (the
// service's KAFKA_SESSION_TIMEOUT, 6 s here, which it sets as its group's
// session under KIP-848 and states itself under the classic protocol) and 3 s
// more, not the broker's default 45 s. The session in force is the metric's.
func TestCrashedReplicasPartitionsMoveWithinTheSession(t *testing.T) {
	session, took := replicaCrashRecovery(t, newBroker(t, false), nil)
	t.Logf("every result applied %s after the kill, the session in force being %s", took.Round(10*time.Millisecond), session)
	if session != 6*time.Second {
		t.Errorf("the group's session in force is %s, want the service's 6s", session)
	}
	if took > session+3*time.Second {
		t.Errorf("the dead member's results waited %s, want within the session %s and 3 s", took.Round(10*time.Millisecond), session)
	}
}

// replicaCrashRecovery starts two replicas on b (serviceEnv, with extra),
// SIGKILLs one while orders keep coming to the other, writes a result for
// each of 30 orders spread over the partitions, and returns the group's
// session in force and how long after the kill the last result was applied.
func replicaCrashRecovery(t testing.TB, b *broker, extra map[string]string) (session, took time.Duration) {
	t.Helper()
	dbURL := newSchema(t)
	replica := func() *child {
		env := childEnvFor(dbURL, b)
		maps.Copy(env, extra)
		return startChild(t, env)
	}
	a, c := replica(), replica()
	a.waitReady(t)
	c.waitReady(t)
	waitOwning(t, a.url, c.url)
	session = time.Duration(metric(t, a.url, "payment_results_group_session_seconds") * float64(time.Second))
	user := newUser()
	var ids []string
	for range 30 { // their keys spread over the three partitions
		ids = append(ids, do(t, "POST", a.url+"/orders", `{"amount": 5}`, "X-User-Id", user).order(t).ID)
	}
	// Under load: orders keep coming to the survivor throughout.
	stop := make(chan struct{})
	var load sync.WaitGroup
	load.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				do(t, "POST", a.url+"/orders", `{"amount": 1}`, "X-User-Id", user)
			}
		}
	})
	defer func() { close(stop); load.Wait() }()

	c.kill(t)
	killed := time.Now()
	producePaid(t, b, ids...)
	waitFor(t, 2*session+60*time.Second, "every result applied after the kill", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'PAID'`, ids) == len(ids)
	})
	return session, time.Since(killed)
}
