package main

// broker_test.go: with the broker down, refusing or back, orders are still
// taken, no transaction waits for it, and every event is published soon after
// it returns.

import (
	"context"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
)

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

// swallow makes the in-process broker take requests of the given keys (all,
// if none) and never answer them, until the returned func is called.
func swallow(b *broker, keys ...kmsg.Key) func() {
	var on atomic.Bool
	on.Store(true)
	fn := func(kmsg.Request) (kmsg.Response, error, bool) {
		if !on.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return nil, nil, true
	}
	if len(keys) == 0 {
		b.cluster.Control(fn)
	}
	for _, k := range keys {
		b.cluster.ControlKey(k.Int16(), fn)
	}
	return func() { on.Store(false) }
}
