package main

// Broker failures on a real Apache Kafka cluster of three KRaft nodes
// (replication factor 3, min.insync.replicas=2), started by .ci/kafka.sh, and
// static group membership. kfake has no replication, leaders that move only
// when told and groups that rebalance at once: these promises are tested
// where those things are real.

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// kafkaCluster is a 3-node Apache Kafka cluster of this test run.
type kafkaCluster struct {
	script, dir string
	env         []string
	addrs       []string
}

func startKafkaCluster(t testing.TB) *kafkaCluster {
	t.Helper()
	c := &kafkaCluster{script: kafkaScript(t), dir: t.TempDir(), env: append(os.Environ(), "KAFKA_PORT_BASE=29080")}
	out := c.run(t, "start", "3", c.dir)
	c.addrs = strings.Split(strings.TrimSpace(out), ",")
	t.Cleanup(func() { exec.Command(c.script, "stop", c.dir).Run() })
	return c
}

func (c *kafkaCluster) run(t testing.TB, args ...string) string {
	t.Helper()
	return runScript(t, c.env, c.script, args...)
}

// broker is the cluster as the other tests' helpers see it.
func (c *kafkaCluster) broker() *broker {
	return &broker{addrs: c.addrs, prefix: "t" + randomHex(4) + "."}
}

// serviceOn starts the service on the cluster, with topics of its own, and
// returns once a first order is on pay-order: topics, leaders and the
// producer are up.
func (c *kafkaCluster) serviceOn(t *testing.T) (*broker, string, *service, string) {
	return c.serviceOnEnv(t, nil)
}

func (c *kafkaCluster) serviceOnEnv(t *testing.T, extra map[string]string) (*broker, string, *service, string) {
	t.Helper()
	b := c.broker()
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	for k, v := range extra {
		env[k] = v
	}
	s := startService(t, env)
	user := newUser()
	readPayOrders(t, b, []string{s.createOrder(t, user, 1).ID}, 30*time.Second)
	return b, dbURL, s, user
}

// leaderOf returns the node leading partition 0 of topic.
func leaderOf(t *testing.T, b *broker, topic string) int32 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var leader int32 = -1
	waitFor(t, 30*time.Second, "a leader for "+topic, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		md, err := kadm.NewClient(cl).Metadata(ctx, topic)
		if err != nil {
			return false
		}
		if p, ok := md.Topics[topic].Partitions[0]; ok && p.Err == nil && len(p.ISR) == 3 {
			leader = p.Leader
			return true
		}
		return false
	})
	return leader
}

// On a 3-node Apache Kafka cluster: a leader killed under load loses no event;
// the whole cluster stopped and back publishes every event, the first within 1
// s of every partition taking writes again; a replica SIGKILLed before the
// whole cluster restarts leaves the survivor applying results within 10 s of
// the cluster's return (KIP-848), stopping cleanly then, and every result
// applied once the dead member's session ends; a rebalance while results flow
// applies each once; SIGTERM mid-rebalance exits in time.
func TestClusterFailures(t *testing.T) {
	c := startKafkaCluster(t)

	t.Run("kill -9 the leader while orders are created", func(t *testing.T) {
		b, _, s, user := c.serviceOn(t)
		leader := leaderOf(t, b, b.topic(topicPayOrder))

		// A steady 50 orders/s for 6 s; the leader dies after 2 s.
		var ids []string
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		start := time.Now()
		killed := false
		for time.Since(start) < 6*time.Second {
			<-tick.C
			ids = append(ids, s.createOrder(t, user, 2).ID)
			if !killed && time.Since(start) > 2*time.Second {
				c.run(t, "kill", fmt.Sprint(leader), c.dir)
				killed = true
			}
		}
		readPayOrders(t, b, ids, 60*time.Second)
		t.Logf("leader node %d killed under %d orders: all published, each within %ss of its commit", leader, len(ids),
			publishLatencyBound(t, s.url))
		if n := metric(t, s.url, "outbox_events_published_total"); n < float64(len(ids)+1) {
			t.Errorf("published_total %v for %d orders", n, len(ids)+1)
		}
		c.run(t, "restart", fmt.Sprint(leader), c.dir)
	})

	// With a 1s produce deadline the relay spends the outage in its backoff
	// (up to 5s); with the default 10s it is inside a produce try.
	for _, produceTimeout := range []string{"1s", "10s"} {
		t.Run("the whole cluster stops and returns, produce timeout "+produceTimeout, func(t *testing.T) {
			wholeClusterReturns(t, c, produceTimeout)
		})
	}

	// KIP-848 (the default protocol): the dead member's session restarts
	// when a coordinator loads the group, but only its own partitions wait
	// for it. The session is the default's, not the other tests' 6 s,
	// which would hide a classic group's wait.
	// Then the survivor is stopped while the dead member still holds its
	// partitions: under the classic protocol its leave waited for that
	// rebalance and spent the whole shutdown budget.
	t.Run("a replica crashes, then the whole cluster restarts", func(t *testing.T) {
		r := crashThenClusterRestart(t, c, map[string]string{"KAFKA_SESSION_TIMEOUT": "45s", "SHUTDOWN_TIMEOUT": "5s"}, true)
		t.Logf("first result applied %s after the cluster took writes again, every result %s after; "+
			"the survivor stopped %s after SIGTERM", r.first.Round(time.Millisecond), r.all.Round(time.Millisecond),
			r.exit.Round(time.Millisecond))
		if r.first > 10*time.Second {
			t.Errorf("first result applied %s after the cluster took writes again, want within 10s", r.first.Round(time.Millisecond))
		}
		if r.exitLog != "stopped" {
			t.Errorf("the survivor's SIGTERM: %q after %s, want a clean stop within SHUTDOWN_TIMEOUT (5s)", r.exitLog, r.exit)
		}
	})

	// A session the brokers refuse (compose.yaml's minimum is 6 s): the
	// service starts all the same, says so once, shows the session in
	// force (the brokers' default, 45 s), and applies results as before.
	t.Run("a group session the brokers refuse", func(t *testing.T) {
		b, _, s, user := c.serviceOnEnv(t, map[string]string{"KAFKA_SESSION_TIMEOUT": "5s"})
		session := func() float64 { return metric(t, s.url, "payment_results_group_session_seconds") }
		waitFor(t, 30*time.Second, "the session in force known", func() bool { return session() > 0 })
		if got := session(); got != 45 {
			t.Errorf("payment_results_group_session_seconds %v, want the brokers' default 45", got)
		}
		o := s.createOrder(t, user, 5)
		producePaid(t, b, o.ID)
		waitFor(t, 30*time.Second, "the result applied", func() bool { return s.getOrder(t, user, o.ID).Status == "PAID" })
		if n := strings.Count(s.logs.String(), "the broker refused the group's session"); n != 1 {
			t.Errorf("the refusal was logged %d times, want once:\n%s", n, s.logs.String())
		}
	})

	t.Run("a rebalance while results flow", func(t *testing.T) {
		b := c.broker()
		dbURL := newSchema(t)
		env := serviceEnv(dbURL, b)
		first := startService(t, env)
		user := newUser()
		const total = 300
		ids := make([]string, total)
		for i := range ids {
			ids[i] = first.createOrder(t, user, 3).ID
		}
		cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		var wg sync.WaitGroup
		wg.Go(func() { // 300 results over 3 s
			for _, id := range ids {
				if err := cl.ProduceSync(context.Background(), &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(id),
					Value: []byte(`{"order_id": "` + id + `", "status": "PAID"}`)}).FirstErr(); err != nil {
					t.Errorf("produce: %v", err)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
		paid := func(n int) func() bool {
			return func() bool { return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) >= n }
		}
		waitFor(t, 30*time.Second, "results flowing", paid(total/4))
		second := startService(t, env) // joins: a rebalance
		waitFor(t, 30*time.Second, "results flowing", paid(total/2))
		if err := first.stop(t); err != nil { // leaves gracefully: another
			t.Errorf("first replica stopped with %v", err)
		}
		wg.Wait()
		waitFor(t, 60*time.Second, "every order PAID", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == total
		})
		waitCommitted(t, b)
		if n := endOffsets(t, b, b.topic(topicPaymentDLQ)); n != 0 {
			t.Errorf("%d results dead-lettered", n)
		}
		t.Logf("rebalance under flow: %d applied; the second replica applied %v and ignored %v redelivered",
			total, metric(t, second.url, `payment_results_applied_total{status="PAID"}`), metric(t, second.url, "payment_results_ignored_total"))
	})

	t.Run("SIGTERM while the group rebalances", func(t *testing.T) {
		b := c.broker()
		dbURL := newSchema(t)
		env := childEnvFor(dbURL, b)
		env["SHUTDOWN_TIMEOUT"] = "5s"
		one := startChild(t, env)
		one.waitReady(t)
		user := newUser()
		var ids []string
		for range 20 {
			ids = append(ids, do(t, "POST", one.url+"/orders", `{"amount": 4}`, "X-User-Id", user).order(t).ID)
		}
		readPayOrders(t, b, ids, 30*time.Second)
		env2 := childEnvFor(dbURL, b)
		two := startChild(t, env2)
		two.waitReady(t) // its join starts a rebalance
		for _, id := range ids {
			produce(t, b, b.topic(topicPaymentResults), id, `{"order_id": "`+id+`", "status": "PAID"}`)
		}
		took := one.sigterm(t, 20*time.Second)
		t.Logf("SIGTERM during a rebalance: exit after %s (SHUTDOWN_TIMEOUT 5s)", took.Round(time.Millisecond))
		if took > 5500*time.Millisecond || one.err != nil {
			t.Errorf("exit after %s with %v; want status 0 within 5s", took, one.err)
		}
		waitFor(t, 60*time.Second, "every result applied by the remaining replica", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == len(ids)
		})
		waitCommitted(t, b)
		if r := do(t, "GET", two.url+"/readyz", ""); r.status != http.StatusOK {
			t.Errorf("remaining replica not ready: %d %s", r.status, r.body)
		}
	})
}

// publishLatencyBound is the least bucket bound of
// order_publish_latency_seconds that holds every publish so far.
func publishLatencyBound(t *testing.T, baseURL string) string {
	t.Helper()
	body := string(do(t, "GET", baseURL+"/metrics", "").body)
	count := metric(t, baseURL, "order_publish_latency_seconds_count")
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, `order_publish_latency_seconds_bucket{le="`); ok {
			le, n, _ := strings.Cut(rest, `"} `)
			if v, err := strconv.ParseFloat(n, 64); err == nil && v == count {
				return le
			}
		}
	}
	return "+Inf"
}

// wholeClusterReturns stops every node, creates 50 orders, keeps the cluster
// down for 10s and starts it again: every event is published, the first
// within 1s of every partition taking writes again. Not of the first: the
// relay deletes a batch's rows when the batch ends, and the 50 events span
// the three partitions, whose leaders a returning cluster elects one by one
// (up to 1.3 s apart).
func wholeClusterReturns(t *testing.T, c *kafkaCluster, produceTimeout string) {
	b, dbURL, s, user := c.serviceOnEnv(t, map[string]string{"RELAY_PRODUCE_TIMEOUT": produceTimeout})
	c.run(t, "stop", c.dir)
	ids := createPromptly(t, s, user, 50, "with the cluster down")
	// An outage of some seconds, so that the relay is well into its
	// backoff when the cluster returns: the outage itself is the test.
	time.Sleep(10 * time.Second)
	answered := firstWrite(t, b)
	gone := watchDeleted(t, dbURL, ids...)
	c.run(t, "start", "3", c.dir)
	readPayOrders(t, b, ids, 60*time.Second)
	first := gone() // the relay deletes a row once the broker acknowledged its event
	anyBack, back := <-answered.any, <-answered.all
	t.Logf("cluster back: a partition took a write, every partition %s later; first of 50 events published %s after that",
		back.Sub(anyBack).Round(time.Millisecond), first.Sub(back).Round(time.Millisecond))
	if d := first.Sub(back); d > time.Second {
		t.Errorf("first event published %s after every partition took writes again, want within 1s", d.Round(time.Millisecond))
	}
}

// writable is when a client of the test could first write to some partition
// of pay-order again, and when to every one of them: a cluster that returns
// elects its partitions' leaders one by one.
type writable struct{ any, all <-chan time.Time }

// firstWrite probes every 50ms from now on, with acks=all, each partition of
// pay-order that has not yet taken a write (the probes are not orders:
// readPayOrders passes them by).
func firstWrite(t testing.TB, b *broker) writable {
	anyC, allC := make(chan time.Time, 1), make(chan time.Time, 1)
	go func() {
		taken := map[int32]bool{}
		for {
			// A new client each time: nothing it learned while the
			// cluster was down can slow it.
			probe, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...), kgo.RecordRetries(0), kgo.DisableIdempotentWrite(),
				kgo.RecordPartitioner(kgo.ManualPartitioner()))
			if err != nil {
				t.Error(err)
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			var recs []*kgo.Record
			for p := range int32(3) {
				if !taken[p] {
					recs = append(recs, &kgo.Record{Topic: b.topic(topicPayOrder), Partition: p, Value: []byte(`{"probe": true}`)})
				}
			}
			results := probe.ProduceSync(ctx, recs...)
			cancel()
			probe.Close()
			now := time.Now()
			for _, r := range results {
				if r.Err == nil {
					if len(taken) == 0 {
						anyC <- now
					}
					taken[r.Record.Partition] = true
				}
			}
			if len(taken) == 3 {
				allC <- now
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return writable{anyC, allC}
}

// groupRecovery is what crashThenClusterRestart measured, from the moment the
// cluster took writes again: when the surviving replica applied its first
// payment result, and when every result was applied (the dead replica's
// partitions included).
type groupRecovery struct {
	first, all time.Duration
	// With stopSurvivor: how long the survivor took to exit after SIGTERM,
	// and "stopped" or else its log from the SIGTERM on.
	exit    time.Duration
	exitLog string
}

// crashThenClusterRestart runs two replicas in one group with extra settings,
// SIGKILLs one, stops the whole cluster at once (before the dead member's
// session can end) and starts it again; then it writes three payment results
// to each partition of payment-results. With stopSurvivor, the surviving
// replica is sent SIGTERM once it has applied one (or 10 s after the cluster
// took writes, if it has not), and a third replica applies the rest.
func crashThenClusterRestart(t testing.TB, c *kafkaCluster, extra map[string]string, stopSurvivor bool) groupRecovery {
	t.Helper()
	b := c.broker()
	dbURL := newSchema(t)
	replica := func(i int) *child {
		env := childEnvFor(dbURL, b)
		maps.Copy(env, extra)
		if id := env["KAFKA_GROUP_INSTANCE_ID"]; id != "" {
			env["KAFKA_GROUP_INSTANCE_ID"] = fmt.Sprintf("%s-%d", id, i)
		}
		c := startChild(t, env)
		c.waitReady(t)
		return c
	}
	replicas := [2]*child{replica(0), replica(1)}
	user := newUser()
	ids := make([]string, 0, 100)
	for range cap(ids) {
		ids = append(ids, do(t, "POST", replicas[1].url+"/orders", `{"amount": 5}`, "X-User-Id", user).order(t).ID)
	}
	readPayOrders(t, b, ids, 30*time.Second)
	// Under KIP-848 the second replica gets partitions a heartbeat or two
	// after it joins. Then results one at a time until each replica has
	// applied one.
	waitOwning(t, replicas[0].url, replicas[1].url)
	applied := func(c *child) float64 { return metric(t, c.url, `payment_results_applied_total{status="PAID"}`) }
	next := 0
	waitFor(t, 60*time.Second, "both replicas applying results", func() bool {
		produce(t, b, b.topic(topicPaymentResults), ids[next], `{"order_id": "`+ids[next]+`", "status": "PAID"}`)
		next++
		return next == 90 || applied(replicas[0]) > 0 && applied(replicas[1]) > 0
	})
	if next == 90 {
		t.Fatalf("after %d results one replica had applied none", next)
	}

	replicas[0].kill(t)
	c.run(t, "stop", c.dir)
	answered := firstWrite(t, b)
	c.run(t, "start", "3", c.dir)
	back := <-answered.any

	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	last := ids[next : next+9]
	for i, id := range last {
		r := &kgo.Record{Topic: b.topic(topicPaymentResults), Partition: int32(i % 3), Key: []byte(id),
			Value: []byte(`{"order_id": "` + id + `", "status": "PAID"}`)}
		cl.Produce(context.Background(), r, func(_ *kgo.Record, err error) {
			if err != nil {
				t.Errorf("produce: %v", err)
			}
		})
	}
	var r groupRecovery
	paid := func() int {
		return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID' AND id = ANY($1)`, last)
	}
	resumed := func() bool {
		if r.first == 0 && paid() > 0 {
			r.first = time.Since(back)
		}
		return r.first > 0
	}
	if stopSurvivor {
		// Stopped at its first result or 10 s after the cluster took
		// writes, whichever comes first: in either case while the dead
		// member still holds its partitions.
		for deadline := back.Add(10 * time.Second); !resumed() && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		r.exit = replicas[1].sigterm(t, 30*time.Second)
		out := replicas[1].out.String()
		r.exitLog = "stopped"
		if !strings.Contains(out, "msg=stopped") {
			r.exitLog = out[max(0, strings.Index(out, `msg="shutting down"`)):]
		}
		replica(2)
	}
	waitFor(t, 120*time.Second, "a result applied after the restart", resumed)
	waitFor(t, 180*time.Second, "every result applied after the restart", func() bool { return paid() == len(last) })
	r.all = time.Since(back)
	return r
}

// BenchmarkGroupRecovery measures crashThenClusterRestart for each group
// protocol and setting (docs/history.md). It needs KAFKA_SCRIPT and takes
// minutes: run with -benchtime=1x.
func BenchmarkGroupRecovery(b *testing.B) {
	c := startKafkaCluster(b)
	for _, s := range []struct {
		name string
		env  map[string]string
	}{
		{"consumer", map[string]string{"KAFKA_GROUP_PROTOCOL": "consumer", "KAFKA_SESSION_TIMEOUT": "10s"}},
		{"consumer_session_45s", map[string]string{"KAFKA_GROUP_PROTOCOL": "consumer", "KAFKA_SESSION_TIMEOUT": "45s"}},
		{"classic", map[string]string{"KAFKA_GROUP_PROTOCOL": "classic", "KAFKA_SESSION_TIMEOUT": "45s"}},
		{"classic_static", map[string]string{"KAFKA_GROUP_PROTOCOL": "classic", "KAFKA_SESSION_TIMEOUT": "45s",
			"KAFKA_GROUP_INSTANCE_ID": "replica-" + randomHex(4)}},
		{"classic_session_10s", map[string]string{"KAFKA_GROUP_PROTOCOL": "classic", "KAFKA_SESSION_TIMEOUT": "10s"}},
	} {
		b.Run(s.name, func(b *testing.B) {
			for range b.N {
				r := crashThenClusterRestart(b, c, s.env, false)
				b.ReportMetric(r.first.Seconds(), "s_first_result")
				b.ReportMetric(r.all.Seconds(), "s_all_results")
			}
		})
	}
}
