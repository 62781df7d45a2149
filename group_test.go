package main

// group_test.go: replicas share the work: each event published once, each
// result applied once, and a replica that fails or dies holds up no other
// for longer than the group's session.

import (
	"context"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

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

// Under the classic protocol, a replica with a static identity
// (KAFKA_GROUP_INSTANCE_ID) that crashes and comes back takes its partitions
// back at once; without one it would wait out the dead member's session
// timeout (here 60 s). Under KIP-848 the broker refuses the identity of a
// member that crashed until its session ends (UNRELEASED_INSTANCE_ID):
// docs/design.md, "Consumer group protocols".
func TestStaticMemberRestartsWithoutWaitingForTheSession(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	env["KAFKA_GROUP_PROTOCOL"] = "classic"
	env["KAFKA_GROUP_INSTANCE_ID"] = "replica-" + randomHex(4)
	env["KAFKA_SESSION_TIMEOUT"] = "60s"
	c := startChild(t, env)
	c.waitReady(t)
	user := newUser()
	applied := func(url string) {
		t.Helper()
		o := do(t, "POST", url+"/orders", `{"amount": 1}`, "X-User-Id", user).order(t)
		produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`)
		waitFor(t, 20*time.Second, "the result applied", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM orders WHERE id = $1 AND status = 'PAID'`, o.ID) == 1
		})
	}
	applied(c.url)
	c.kill(t)
	env["HTTP_ADDR"] = "127.0.0.1:" + freePort()
	c2 := startChild(t, env)
	c2.waitReady(t)
	restarted := time.Now()
	applied(c2.url) // within 20 s, a third of the session timeout
	t.Logf("static member restarted after SIGKILL: a result applied %s after it was ready", time.Since(restarted).Round(time.Millisecond))
}

// twoReplicas starts two replicas of the service as child processes on b and
// a fresh schema (childEnvFor, with extra), and returns once each owns
// partitions of payment-results.
func twoReplicas(t testing.TB, b *broker, extra map[string]string) (dbURL string, a, c *child) {
	t.Helper()
	dbURL = newSchema(t)
	replica := func() *child {
		env := childEnvFor(dbURL, b)
		maps.Copy(env, extra)
		return startChild(t, env)
	}
	a, c = replica(), replica()
	a.waitReady(t)
	c.waitReady(t)
	waitOwning(t, a.url, c.url)
	return dbURL, a, c
}

// replicaCrashRecovery starts two replicas on b (serviceEnv, with extra),
// SIGKILLs one while orders keep coming to the other, writes a result for
// each of 30 orders spread over the partitions, and returns the group's
// session in force and how long after the kill the last result was applied.
func replicaCrashRecovery(t testing.TB, b *broker, extra map[string]string) (session, took time.Duration) {
	t.Helper()
	dbURL, a, c := twoReplicas(t, b, extra)
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
