package main

// The tests start the real program (run) against a real PostgreSQL database,
// created for this test run and dropped after it, and a real Kafka-protocol
// broker: an in-process kfake cluster, or the cluster in KAFKA_BROKERS. They
// assert on HTTP answers, rows and Kafka records.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
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
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
)

// --- the API ---

// An order and its pay-order event commit together, and the event is published
// with the order id as key, an event-id header and the contract's fields.
func TestCreateOrderWritesOrderAndOutboxAndPublishes(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()

	r := do(t, "POST", s.url+"/orders", `{"amount": 4200, "description": "книга; DROP TABLE orders; --'\""}`,
		"X-User-Id", user, "Content-Type", "application/json")
	if r.status != http.StatusCreated {
		t.Fatalf("status %d %s", r.status, r.body)
	}
	o := r.order(t)
	if r.header.Get("Location") != "/orders/"+o.ID || !isUUID(o.ID) {
		t.Errorf("Location %q for id %q", r.header.Get("Location"), o.ID)
	}
	if o.UserID != user || o.Amount != 4200 || o.Status != "PENDING" || o.Description != `книга; DROP TABLE orders; --'"` {
		t.Errorf("order %+v", o)
	}
	if o.CreatedAt.IsZero() || !o.CreatedAt.Equal(o.UpdatedAt) {
		t.Errorf("times %v %v", o.CreatedAt, o.UpdatedAt)
	}
	var raw map[string]any
	r.json(t, &raw)
	for _, f := range []string{"id", "user_id", "amount", "description", "status", "created_at", "updated_at"} {
		if _, ok := raw[f]; !ok {
			t.Errorf("order JSON lacks %q: %s", f, r.body)
		}
	}
	if _, err := time.Parse(time.RFC3339, raw["created_at"].(string)); err != nil {
		t.Errorf("created_at is not RFC 3339: %v", err)
	}

	recs := readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	if len(recs) != 1 {
		t.Fatalf("want 1 pay-order record, got %d", len(recs))
	}
	p := recs[0]
	if p.key != o.ID || p.OrderID != o.ID || p.UserID != user || p.Amount != 4200 || !p.CreatedAt.Equal(o.CreatedAt) {
		t.Errorf("pay-order record %+v for order %+v", p, o)
	}
	if !isUUID(p.EventID) || p.header != p.EventID {
		t.Errorf("event_id %q, event-id header %q", p.EventID, p.header)
	}
	// The outbox is a queue: the published event's row is gone.
	waitFor(t, 5*time.Second, "the published event's outbox row deleted", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
}

// Bad input gets a problem+json 4xx that says what is wrong, and writes no
// order and no event.
func TestCreateOrderRejectsBadInputAndWritesNothing(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()

	long := strings.Repeat("я", 1001)
	cases := []struct {
		name    string
		body    string
		headers []string
		status  int
	}{
		{"no user", `{"amount": 1}`, nil, 401},
		{"empty user", `{"amount": 1}`, []string{"X-User-Id", ""}, 401},
		{"user too long", `{"amount": 1}`, []string{"X-User-Id", strings.Repeat("u", 129)}, 400},
		{"user not printable", `{"amount": 1}`, []string{"X-User-Id", "a\tb"}, 400},
		{"malformed JSON", `{"amount": `, nil, 400},
		{"not an object", `[1]`, nil, 400},
		{"empty body", ``, nil, 400},
		{"unknown field", `{"amount": 1, "currency": "RUB"}`, nil, 400},
		{"amount a string", `{"amount": "100"}`, nil, 400},
		{"amount a fraction", `{"amount": 1.5}`, nil, 400},
		{"amount zero", `{"amount": 0}`, nil, 400},
		{"amount negative", `{"amount": -5}`, nil, 400},
		{"amount over int64", `{"amount": 9223372036854775808}`, nil, 400},
		{"amount over int64, exponent", `{"amount": 1e19}`, nil, 400},
		{"amount a fraction, exponent", `{"amount": 15e-1}`, nil, 400},
		{"amount a tiny fraction", `{"amount": 1.0000000000000000000000001}`, nil, 400},
		{"amount a huge exponent", `{"amount": 1e999999999999}`, nil, 400},
		{"amount zero, exponent", `{"amount": 0e5}`, nil, 400},
		{"amount a bool", `{"amount": true}`, nil, 400},
		{"amount an object", `{"amount": {}}`, nil, 400},
		{"amount missing", `{"description": "x"}`, nil, 400},
		{"amount null", `{"amount": null}`, nil, 400},
		{"description too long", `{"amount": 1, "description": "` + long + `"}`, nil, 400},
		{"description not a string", `{"amount": 1, "description": 7}`, nil, 400},
		{"invalid UTF-8", "{\"amount\": 1, \"description\": \"\xff\"}", nil, 400},
		{"NUL in description", `{"amount": 1, "description": "a\u0000b"}`, nil, 400},
		{"trailing data", `{"amount": 1} {"amount": 2}`, nil, 400},
		{"idempotency key too long", `{"amount": 1}`, []string{"Idempotency-Key", strings.Repeat("k", 256)}, 400},
		{"body over 1 MiB", `{"amount": 1, "description": "` + strings.Repeat(" ", 1<<20) + `"}`, nil, 413},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := c.headers
			if c.name != "no user" && c.name != "empty user" && !strings.HasPrefix(c.name, "user ") {
				h = append([]string{"X-User-Id", user}, h...)
			}
			r := do(t, "POST", s.url+"/orders", c.body, h...)
			if r.status != c.status {
				t.Fatalf("status %d, want %d: %s", r.status, c.status, r.body)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
				t.Errorf("Content-Type %q", ct)
			}
			var p problem
			r.json(t, &p)
			if p.Status != c.status || p.Title != http.StatusText(c.status) || p.Type == "" || p.Detail == "" {
				t.Errorf("problem %+v", p)
			}
		})
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 0 {
		t.Errorf("bad requests wrote %d orders", n)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox`); n != 0 {
		t.Errorf("bad requests wrote %d outbox rows", n)
	}

	// A whole number is an integer however it is written (JSON Schema's
	// reading, and what a generated client may send).
	for body, want := range map[string]int64{
		`{"amount": 1500.0}`: 1500, `{"amount": 1.5e3}`: 1500, `{"amount": 15E2}`: 1500,
		`{"amount": 150000e-2}`: 1500, `{"amount": 9.223372036854775807e18}`: 1<<63 - 1,
	} {
		r := do(t, "POST", s.url+"/orders", body, "X-User-Id", user)
		if r.status != http.StatusCreated || r.order(t).Amount != want {
			t.Errorf("%s: %d %s, want 201 with amount %d", body, r.status, r.body, want)
		}
	}

	// The limits themselves are accepted.
	r := do(t, "POST", s.url+"/orders", `{"amount": 9223372036854775807, "description": "`+long[:len(long)-2]+`"}`,
		"X-User-Id", strings.Repeat("u", 128))
	if r.status != http.StatusCreated {
		t.Fatalf("largest valid order: %d %s", r.status, r.body)
	}
}

// An Idempotency-Key replay returns the same order and emits no second event,
// even when the replays are concurrent; the same key with another body is 409.
func TestIdempotencyKey(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	alice, bob := newUser(), newUser()

	first := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if first.status != http.StatusCreated {
		t.Fatalf("first: %d %s", first.status, first.body)
	}
	again := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if again.status != http.StatusOK || again.order(t).ID != first.order(t).ID {
		t.Fatalf("replay: %d %s, want 200 with %s", again.status, again.body, first.order(t).ID)
	}
	conflict := do(t, "POST", s.url+"/orders", `{"amount": 701, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if conflict.status != http.StatusConflict || conflict.header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("different body: %d %s, want 409", conflict.status, conflict.body)
	}
	other := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", bob, "Idempotency-Key", "k-1")
	if other.status != http.StatusCreated || other.order(t).ID == first.order(t).ID {
		t.Fatalf("same key, other user: %d %s, want a new order", other.status, other.body)
	}

	// Concurrent replays: exactly one creates, the rest get its order.
	const n = 20
	var created, replayed atomic.Int32
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			r := do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", alice, "Idempotency-Key", "race")
			switch r.status {
			case http.StatusCreated:
				created.Add(1)
			case http.StatusOK:
				replayed.Add(1)
			default:
				t.Errorf("concurrent replay: %d %s", r.status, r.body)
				return
			}
			ids[i] = r.order(t).ID
		})
	}
	wg.Wait()
	if created.Load() != 1 || replayed.Load() != n-1 {
		t.Errorf("concurrent: %d created, %d replayed", created.Load(), replayed.Load())
	}
	for _, id := range ids {
		if id != ids[0] {
			t.Errorf("concurrent replays returned different orders: %v", ids)
			break
		}
	}
	if c := count(t, dbURL, `SELECT count(*) FROM orders`); c != 3 {
		t.Errorf("orders: %d, want 3", c)
	}
	waitDrained(t, dbURL) // the outbox is empty once every event is published
	if n := endOffsets(t, b, b.topic(topicPayOrder)); n != 3 {
		t.Errorf("pay-order holds %d events, want 3 (no event for a replay)", n)
	}
}

// Paging through a user's orders visits each exactly once, newest first,
// however the pages fall.
func TestListOrdersPagesEveryOrderOnceNewestFirst(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	alice, bob := newUser(), newUser()

	var want []string
	for i := range 23 {
		want = append(want, s.createOrder(t, alice, int64(100+i)).ID)
	}
	s.createOrder(t, bob, 1)
	// Orders created in one transaction share created_at: make some ties
	// so paging has to order by id as well.
	if _, err := schemaPool(t, dbURL).Exec(context.Background(),
		`UPDATE orders SET created_at = (SELECT min(created_at) FROM orders) WHERE amount BETWEEN 105 AND 112`); err != nil {
		t.Fatal(err)
	}

	var got []Order
	cursor := ""
	pages := 0
	for {
		u := s.url + "/orders?limit=5"
		if cursor != "" {
			u += "&cursor=" + url.QueryEscape(cursor)
		}
		r := do(t, "GET", u, "", "X-User-Id", alice)
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: %d %s", u, r.status, r.body)
		}
		var page struct {
			Orders     []Order `json:"orders"`
			NextCursor *string `json:"next_cursor"`
		}
		r.json(t, &page)
		pages++
		got = append(got, page.Orders...)
		if page.NextCursor == nil {
			break
		}
		if len(page.Orders) != 5 {
			t.Fatalf("page %d has %d orders and a next_cursor", pages, len(page.Orders))
		}
		cursor = *page.NextCursor
	}
	if pages != 5 || len(got) != 23 {
		t.Fatalf("%d pages, %d orders; want 5 pages, 23 orders", pages, len(got))
	}
	seen := map[string]bool{}
	for i, o := range got {
		if o.UserID != alice {
			t.Errorf("another user's order in alice's list: %+v", o)
		}
		if seen[o.ID] {
			t.Errorf("order %s listed twice", o.ID)
		}
		seen[o.ID] = true
		if i > 0 {
			prev := got[i-1]
			if o.CreatedAt.After(prev.CreatedAt) || o.CreatedAt.Equal(prev.CreatedAt) && o.ID > prev.ID {
				t.Errorf("not newest first at %d: %v/%s after %v/%s", i, o.CreatedAt, o.ID, prev.CreatedAt, prev.ID)
			}
		}
	}
	for _, id := range want {
		if !seen[id] {
			t.Errorf("order %s never listed", id)
		}
	}

	r := do(t, "GET", s.url+"/orders", "", "X-User-Id", alice)
	var all orderPage
	r.json(t, &all)
	if len(all.Orders) != 23 || all.NextCursor != "" || bytes.Contains(r.body, []byte("next_cursor")) {
		t.Errorf("default page: %d orders, next_cursor %q", len(all.Orders), all.NextCursor)
	}

	for _, q := range []string{"limit=0", "limit=501", "limit=x", "limit=", "cursor=%%%", "cursor=bm9wZQ", "cursor="} {
		r := do(t, "GET", s.url+"/orders?"+q, "", "X-User-Id", alice)
		if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("?%s: %d %s, want 400 problem", q, r.status, r.body)
		}
	}
	if r := do(t, "GET", s.url+"/orders", ""); r.status != http.StatusUnauthorized {
		t.Errorf("list without X-User-Id: %d", r.status)
	}
}

// Another user's order is never visible: 404, as for an order that does not
// exist.
func TestGetOrderIsolatesUsers(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	alice, bob := newUser(), newUser()
	o := s.createOrder(t, alice, 99)

	if got := s.getOrder(t, alice, o.ID); got.ID != o.ID || got.Amount != 99 {
		t.Errorf("own order: %+v", got)
	}
	if got := s.getOrder(t, alice, strings.ToUpper(o.ID)); got.ID != o.ID {
		t.Errorf("upper-case id: %+v", got)
	}
	for _, c := range []struct {
		user, id string
		status   int
	}{
		{bob, o.ID, 404},
		{alice, "01890000-0000-7000-8000-000000000000", 404},
		{alice, "not-a-uuid", 400},
		{alice, "' OR 1=1 --", 400},
		{"", o.ID, 401},
	} {
		r := do(t, "GET", s.url+"/orders/"+url.PathEscape(c.id), "", "X-User-Id", c.user)
		if r.status != c.status || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("GET %s as %q: %d %s, want %d problem", c.id, c.user, r.status, r.body, c.status)
		}
		if bytes.Contains(r.body, []byte(alice)) {
			t.Errorf("answer leaks the owner: %s", r.body)
		}
	}
	r := do(t, "GET", s.url+"/orders", "", "X-User-Id", bob)
	var page orderPage
	r.json(t, &page)
	if len(page.Orders) != 0 {
		t.Errorf("bob lists alice's orders: %s", r.body)
	}
}

// --- payment results ---

// A payment result is applied once; duplicates and conflicting results change
// nothing; offsets are committed only after the database.
func TestPaymentResultsApplyOnceAndCommitOffsets(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	paid, failed := s.createOrder(t, user, 10), s.createOrder(t, user, 20)

	results := b.topic(topicPaymentResults)
	produce(t, b, results, paid.ID, `{"order_id": "`+paid.ID+`", "status": "PAID"}`)
	produce(t, b, results, failed.ID, `{"order_id": "`+failed.ID+`", "status": "FAILED", "reason": "card declined"}`)
	waitFor(t, 10*time.Second, "both results applied", func() bool {
		return s.getOrder(t, user, paid.ID).Status == "PAID" && s.getOrder(t, user, failed.ID).Status == "FAILED"
	})
	p, f := s.getOrder(t, user, paid.ID), s.getOrder(t, user, failed.ID)
	if f.FailureReason == nil || *f.FailureReason != "card declined" || p.FailureReason != nil {
		t.Errorf("reasons: paid %v, failed %v", p.FailureReason, f.FailureReason)
	}
	if !p.UpdatedAt.After(p.CreatedAt) {
		t.Errorf("updated_at %v not after created_at %v", p.UpdatedAt, p.CreatedAt)
	}

	// A duplicate and a conflicting later result change nothing.
	produce(t, b, results, paid.ID,
		`{"order_id": "`+paid.ID+`", "status": "PAID"}`,
		`{"order_id": "`+paid.ID+`", "status": "FAILED", "reason": "late"}`)
	produce(t, b, results, failed.ID, `{"order_id": "`+failed.ID+`", "status": "PAID"}`)
	waitCommitted(t, b)
	if got := s.getOrder(t, user, paid.ID); got.Status != "PAID" || !got.UpdatedAt.Equal(p.UpdatedAt) || got.FailureReason != nil {
		t.Errorf("paid order changed by later results: %+v", got)
	}
	if got := s.getOrder(t, user, failed.ID); got.Status != "FAILED" || !got.UpdatedAt.Equal(f.UpdatedAt) {
		t.Errorf("failed order changed by a later result: %+v", got)
	}
	if n := len(readTopicNow(t, b, b.topic(topicPaymentDLQ))); n != 0 {
		t.Errorf("%d duplicates sent to the DLQ, want none", n)
	}
}

// Poison payment results go to the DLQ with an error header and never block
// their partition: the results after them are applied.
func TestPoisonPaymentResultsGoToDLQWithoutBlocking(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	o := s.createOrder(t, user, 10)

	poison := []string{
		`{"order_id": "` + o.ID,                                                  // malformed JSON
		`{"order_id": "` + o.ID + `", "status": "REFUNDED"}`,                     // unknown status
		`{"order_id": "01890000-0000-7000-8000-000000000000", "status": "PAID"}`, // unknown order
		`{"order_id": "42", "status": "PAID"}`,                                   // not a UUID
		``,                                                                       // empty
	}
	// One key, so all land on one partition ahead of the good record.
	produce(t, b, b.topic(topicPaymentResults), o.ID, append(poison, `{"order_id": "`+o.ID+`", "status": "PAID"}`)...)
	waitFor(t, 10*time.Second, "the good record behind the poison applied", func() bool {
		return s.getOrder(t, user, o.ID).Status == "PAID"
	})
	dlq := readTopic(t, b, b.topic(topicPaymentDLQ), 10*time.Second, func(r []*kgo.Record) bool { return len(r) >= len(poison) })
	if len(dlq) != len(poison) {
		t.Fatalf("DLQ has %d records, want %d", len(dlq), len(poison))
	}
	for i, r := range dlq {
		h := headerMap(r)
		if string(r.Value) != poison[i] || string(r.Key) != o.ID {
			t.Errorf("DLQ record %d: key %q value %q, want the original %q", i, r.Key, r.Value, poison[i])
		}
		if h["error"] == "" || h["original-topic"] != b.topic(topicPaymentResults) || h["original-offset"] != fmt.Sprint(i) {
			t.Errorf("DLQ record %d headers %v", i, h)
		}
	}
	waitCommitted(t, b)
	// One result for an order this service does not have; the rest are not
	// payment results at all.
	if invalid, unknown := metric(t, s.url, `payment_results_dlq_total{reason="invalid"}`),
		metric(t, s.url, `payment_results_dlq_total{reason="unknown_order"}`); invalid != float64(len(poison)-1) || unknown != 1 {
		t.Errorf("DLQ by reason: invalid %v, unknown_order %v; want %d and 1", invalid, unknown, len(poison)-1)
	}
}

// --- faults ---

// /healthz answers 200 while the process lives; /readyz answers 200 naming the
// database and Kafka ok when both are.
func TestReadyzAndHealthz(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	if r := do(t, "GET", s.url+"/healthz", ""); r.status != 200 {
		t.Errorf("healthz %d", r.status)
	}
	r := do(t, "GET", s.url+"/readyz", "")
	if r.status != 200 || !strings.Contains(string(r.body), `"kafka":"ok"`) || !strings.Contains(string(r.body), `"database":"ok"`) {
		t.Errorf("readyz %d %s", r.status, r.body)
	}
}

// A malformed variable stops the start with an error naming it; nothing set is
// a configuration that works for go run . (loopback, embedded broker, demo
// payments).
func TestConfigRejectsBadValues(t *testing.T) {
	for _, env := range []map[string]string{
		{"RELAY_BATCH_SIZE": "0"},
		{"RELAY_POLL_INTERVAL": "soon"},
		{"DEMO_PAYMENTS": "maybe"},
		{"LOG_LEVEL": "loud"},
		{"LOG_FORMAT": "xml"},
	} {
		_, err := loadConfig(func(k string) string { return env[k] })
		if err == nil {
			t.Errorf("%v accepted", env)
		}
	}
	c, err := loadConfig(func(string) string { return "" })
	if err != nil || c.HTTPAddr != "127.0.0.1:8081" || !c.DemoPayments || c.EmbeddedKafkaAddr != "127.0.0.1:9092" || len(c.KafkaBrokers) != 0 {
		t.Errorf("defaults %+v %v", c, err)
	}
	c, _ = loadConfig(func(k string) string { return map[string]string{"KAFKA_BROKERS": "a:9092, b:9092"}[k] })
	if c.DemoPayments || len(c.KafkaBrokers) != 2 || c.KafkaBrokers[1] != "b:9092" {
		t.Errorf("with KAFKA_BROKERS: %+v", c)
	}
}

// TestGoRunWithEmbeddedBroker is the quick start: no KAFKA_BROKERS, so the
// embedded broker and the demo Payment Service run, and orders reach PAID or
// FAILED; a restart on the same data dir keeps every pay-order record.
func TestGoRunWithEmbeddedBroker(t *testing.T) {
	dbURL := newSchema(t)
	dir := t.TempDir()
	port := freePort()
	env := map[string]string{
		"HTTP_ADDR":           "127.0.0.1:0",
		"DATABASE_URL":        dbURL,
		"EMBEDDED_KAFKA_ADDR": "127.0.0.1:" + port,
		"EMBEDDED_KAFKA_DIR":  dir,
	}
	s := startService(t, env)
	user := newUser()
	small, large := s.createOrder(t, user, 1000), s.createOrder(t, user, demoPaymentLimit+1)
	waitFor(t, 15*time.Second, "demo payments answered", func() bool {
		return s.getOrder(t, user, small.ID).Status == "PAID" && s.getOrder(t, user, large.ID).Status == "FAILED"
	})
	if r := s.getOrder(t, user, large.ID).FailureReason; r == nil || !strings.Contains(*r, "limit") {
		t.Errorf("FAILED without a reason: %v", r)
	}
	if err := s.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}

	s2 := startService(t, env)
	b := &broker{addrs: []string{"127.0.0.1:" + port}}
	recs := readPayOrders(t, b, []string{small.ID, large.ID}, 10*time.Second)
	if len(recs) != 2 {
		t.Errorf("after restart pay-order holds %d of our records, want 2", len(recs))
	}
	third := s2.createOrder(t, user, 5)
	waitFor(t, 15*time.Second, "a new order paid after restart", func() bool {
		return s2.getOrder(t, user, third.ID).Status == "PAID"
	})
}

// The demo Payment Service decides each pay-order event once, as the
// contract asks of a Payment Service (docs/api.md): a copy of an event that
// comes again, even one whose amount would now be refused, is answered with
// the decision stored the first time, and its inbox holds the event once.
func TestDemoPaymentServiceDecidesEachEventOnce(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["DEMO_PAYMENTS"] = "true"
	s := startService(t, env)
	user := newUser()
	o := s.createOrder(t, user, 1000)
	waitFor(t, 15*time.Second, "the demo paying the order", func() bool { return s.getOrder(t, user, o.ID).Status == "PAID" })
	ev := readPayOrders(t, b, []string{o.ID}, 10*time.Second)[0]
	again, err := json.Marshal(map[string]any{"event_id": ev.EventID, "order_id": ev.OrderID, "user_id": ev.UserID,
		"amount": demoPaymentLimit + 1, "created_at": ev.CreatedAt})
	if err != nil {
		t.Fatal(err)
	}
	produceRecords(t, b, &kgo.Record{Topic: b.topic(topicPayOrder), Key: []byte(o.ID), Value: again,
		Headers: []kgo.RecordHeader{{Key: "event-id", Value: []byte(ev.EventID)}}})
	var answers []string
	readTopic(t, b, b.topic(topicPaymentResults), 15*time.Second, func(recs []*kgo.Record) bool {
		answers = answers[:0]
		for _, r := range recs {
			if string(r.Key) == o.ID {
				answers = append(answers, string(r.Value))
			}
		}
		return len(answers) == 2
	})
	for _, a := range answers {
		var res paymentResult
		if err := json.Unmarshal([]byte(a), &res); err != nil || res.Status != "PAID" {
			t.Errorf("the demo answered %s, want PAID both times: the event was decided again", a)
		}
	}
	if n := count(t, dbURL, `SELECT count(*) FROM demo_payment_inbox WHERE event_id = $1`, ev.EventID); n != 1 {
		t.Errorf("the demo's inbox holds the event %d times, want 1", n)
	}
}

// childEnv makes the test binary run the service itself, as `go run .` would:
// the crash tests start it as a child process they can SIGKILL.
const childEnv = "ORDER_SERVICE_TEST_CHILD"

func childMain() {
	setTestRlimit()
	main()
}

// --- the relay ---

// With the fallback poll an hour away, only the wake-up that follows the
// order's commit (notifier.announce) can get its event out within the
// deadline.
func TestRelayWakesOnCommitAndDeletesPublishedRows(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["RELAY_POLL_INTERVAL"] = "1h"
	s := startService(t, env)
	user := newUser()
	for range 3 {
		// Let the relay go idle (waiting on NOTIFY) before each order.
		time.Sleep(50 * time.Millisecond) // not a wait for a condition: it sets one up
		o := s.createOrder(t, user, 1)
		readPayOrders(t, b, []string{o.ID}, 3*time.Second)
	}
	waitFor(t, 10*time.Second, "published rows deleted", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 3 {
		t.Errorf("the relay's deletes touched orders: %d left", n)
	}
}

// --- live status (Server-Sent Events) ---

type sseEvent struct{ name, data string }

// The stream is served by replica A, whose consumer reads another topic; the
// result is applied by replica B. Only LISTEN/NOTIFY through PostgreSQL can
// carry the change from B to A.
func TestOrderEventsStreamAChangeAppliedByAnotherReplica(t *testing.T) {
	dbURL := newSchema(t)
	bA, bB := newBroker(t, false), newBroker(t, false)
	a := startService(t, serviceEnv(dbURL, bA))
	bsvc := startService(t, serviceEnv(dbURL, bB))
	user := newUser()
	o := bsvc.createOrder(t, user, 10)

	resp, events := stream(t, a.url, user, o.ID)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	first, _ := nextEvent(t, events, 5*time.Second)
	if first.ID != o.ID || first.Status != "PENDING" {
		t.Fatalf("first event %+v, want the PENDING order at once", first)
	}
	produce(t, bB, bB.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "FAILED", "reason": "card declined"}`)
	second, _ := nextEvent(t, events, 10*time.Second)
	if second.Status != "FAILED" || second.FailureReason == nil || *second.FailureReason != "card declined" {
		t.Fatalf("second event %+v", second)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("the stream went on after a terminal status")
	}
	if got := metric(t, a.url, `payment_results_applied_total{status="FAILED"}`); got != 0 {
		t.Errorf("replica A applied the result itself (%v); the test proves nothing", got)
	}

	// A terminal order: one event, then the end.
	_, events = stream(t, a.url, user, o.ID)
	if ev, _ := nextEvent(t, events, 5*time.Second); ev.Status != "FAILED" {
		t.Errorf("terminal order streamed %+v", ev)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("a terminal order's stream did not end")
	}
}

// An order's event stream is its user's own: another user's, or an unknown
// order, is 404 problem+json, a malformed id 400, no user 401; and shutdown
// ends an open stream within 5 s instead of waiting for it.
func TestOrderEventsIsolationAndErrors(t *testing.T) {
	b := newBroker(t, false)
	s := startService(t, serviceEnv(newSchema(t), b))
	alice := newUser()
	o := s.createOrder(t, alice, 10)
	for _, c := range []struct {
		user, id string
		status   int
	}{
		{newUser(), o.ID, 404},
		{alice, "01890000-0000-7000-8000-000000000000", 404},
		{alice, "nope", 400},
		{"", o.ID, 401},
	} {
		r := do(t, "GET", s.url+"/orders/"+c.id+"/events", "", "X-User-Id", c.user)
		if r.status != c.status || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("events of %s as %q: %d %s, want %d", c.id, c.user, r.status, r.body, c.status)
		}
	}

	// Shutdown ends open streams instead of waiting for them.
	_, events := stream(t, s.url, alice, o.ID)
	nextEvent(t, events, 5*time.Second)
	start := time.Now()
	if err := s.stop(t); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("shutdown with an open stream took %s", d)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("stream still open after shutdown")
	}
}

// --- metrics ---

var (
	sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$`)
	helpRE   = regexp.MustCompile(`^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) \S.*$`)
	typeRE   = regexp.MustCompile(`^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary)$`)
)

// /metrics parses as Prometheus text (promtool) and counts what happened:
// orders, events, results, the DLQ, the consumer's lag.
func TestMetricsParseAndCount(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	o := s.createOrder(t, user, 10)
	do(t, "POST", s.url+"/orders", `{"amount": 0}`, "X-User-Id", user)
	produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`, `garbage`)
	waitCommitted(t, b)
	waitDrained(t, dbURL) // the event published, so its latency observed
	s.getOrder(t, user, o.ID)

	r := do(t, "GET", s.url+"/metrics", "")
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %d %q", r.status, r.header.Get("Content-Type"))
	}
	types := map[string]string{}
	samples := map[string]float64{}
	for i, line := range strings.Split(strings.TrimSuffix(string(r.body), "\n"), "\n") {
		if m := typeRE.FindStringSubmatch(line); m != nil {
			types[m[1]] = m[2]
			continue
		}
		if helpRE.MatchString(line) {
			continue
		}
		m := sampleRE.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("line %d does not parse: %q", i+1, line)
			continue
		}
		family := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(family, suffix); ok && (types[base] == "histogram" || types[base] == "summary") {
				family = base
			}
		}
		if types[family] == "" {
			t.Errorf("line %d: sample before its # TYPE: %q", i+1, line)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("line %d: value %q", i+1, m[3])
		}
		samples[m[1]+m[2]] = v
	}
	for sample, want := range map[string]float64{
		"orders_created_total":                                     1,
		"outbox_events_published_total":                            1,
		`payment_results_applied_total{status="PAID"}`:             1,
		`payment_results_dlq_total{reason="invalid"}`:              1,
		`payment_results_dlq_total{reason="unknown_order"}`:        0,
		`payment_results_dlq_total{reason="refused"}`:              0,
		"outbox_backlog":                                           0,
		"order_publish_latency_seconds_count":                      1,
		"order_result_latency_seconds_count":                       1,
		"outbox_relay_batch_records_count":                         1,
		`outbox_relay_batch_records_bucket{le="1"}`:                1,
		"payment_results_consumer_lag_up":                          1,
		`go_info{version="` + runtime.Version() + `"}`:             1,
		`http_requests_total{route="POST /orders",code="201"}`:     1,
		`http_requests_total{route="POST /orders",code="400"}`:     1,
		`http_requests_total{route="GET /orders/{id}",code="200"}`: 1,
	} {
		if got, ok := samples[sample]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", sample, got, ok, want)
		}
	}
	// The group has committed both records of payment-results: no lag.
	var lag float64
	for p := range 3 {
		v, ok := samples[fmt.Sprintf(`payment_results_consumer_lag{partition="%d"}`, p)]
		if !ok {
			t.Errorf("no consumer lag for partition %d", p)
		}
		lag += v
	}
	if lag != 0 {
		t.Errorf("consumer lag %v after every result was committed", lag)
	}
	// Runtime and process metrics, with the names Prometheus users expect.
	for _, name := range []string{"go_goroutines", "go_threads", "go_memstats_heap_alloc_bytes", "go_memstats_sys_bytes",
		"go_gc_duration_seconds_count", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
		"process_max_fds", "process_virtual_memory_bytes"} {
		if samples[name] <= 0 {
			t.Errorf("%s = %v, want > 0", name, samples[name])
		}
	}
	if start := samples["process_start_time_seconds"]; math.Abs(start-float64(time.Now().Unix())) > 3600 {
		t.Errorf("process_start_time_seconds %v, now %d", start, time.Now().Unix())
	}
	// Histogram buckets are cumulative and end at the count.
	prefix := `http_request_duration_seconds_bucket{route="POST /orders",le=`
	var last float64
	var les []string
	for _, b := range durationBuckets {
		les = append(les, strconv.FormatFloat(b, 'f', -1, 64))
	}
	for _, le := range append(les, "+Inf") {
		v, ok := samples[prefix+`"`+le+`"}`]
		if !ok || v < last {
			t.Errorf("bucket le=%s: %v (present %v) after %v", le, v, ok, last)
		}
		last = v
	}
	if c := samples[`http_request_duration_seconds_count{route="POST /orders"}`]; c != last || c != 2 {
		t.Errorf("count %v, +Inf bucket %v, want 2", c, last)
	}

	// Prometheus's own linter, where it is installed (CI installs it).
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found: install Debian's prometheus package to lint /metrics")
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(r.body)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	checkMonitoring(t, promtool, types)
}

// checkMonitoring holds monitoring/ to the service: every metric the alerting
// rules and the dashboard name is one /metrics serves (families: its TYPE
// lines); the rules and each dashboard query are valid PromQL (promtool check
// rules); the rules' unit tests pass (promtool test rules).
func checkMonitoring(t *testing.T, promtool string, families map[string]string) {
	t.Helper()
	rules, err := os.ReadFile("monitoring/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	b, err := os.ReadFile("monitoring/dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard.json: %v", err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	if len(exprs) < 20 {
		t.Errorf("the dashboard has %d queries", len(exprs))
	}
	metricRE := regexp.MustCompile(`\b(?:orders?|outbox|payment_results|http|database|go|process)_[a-z0-9_]+\b`)
	for _, name := range metricRE.FindAllString(string(rules)+"\n"+strings.Join(exprs, "\n"), -1) {
		family := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && families[base] != "" {
				family = base
			}
		}
		if families[family] == "" {
			t.Errorf("monitoring/ names %s, which /metrics does not serve", name)
		}
	}
	// Each dashboard query as a recording rule, for promtool to parse.
	var gen strings.Builder
	gen.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, e := range exprs {
		fmt.Fprintf(&gen, "      - record: dashboard:query%d\n        expr: %s\n", i, strconv.Quote(e))
	}
	genFile := t.TempDir() + "/dashboard-queries.yml"
	if err := os.WriteFile(genFile, []byte(gen.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"check", "rules", "monitoring/alerts.yml"},
		{"check", "rules", genFile},
		{"test", "rules", "monitoring/alerts_test.yml"},
	} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// --- shared commits ---

// A shared commit keeps each request's own outcome: new orders are created, a
// replay in the same batch gets the first order, a key reused with another
// body conflicts; only a commit that wrote outbox rows wakes the relay.
func TestSharedCommitKeepsPerRequestOutcomes(t *testing.T) {
	dbURL := newSchema(t)
	db := schemaPool(t, dbURL)
	if err := applySchema(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	var announced atomic.Int32 // commits that wrote outbox rows
	w := newOrderWriter(db, "pay-order", 64, 512, newMetrics(), func() { announced.Add(1) })
	key := func(s string) *string { return &s }
	order := func(user string, amount int64, k *string) newOrder {
		return newOrder{ID: newUUID(), UserID: user, Amount: amount, IdempotencyKey: k, RequestHash: []byte{byte(amount)}}
	}

	// One batch: two new orders, a replay of a key used earlier in the same
	// batch, and a reuse of that key with another body.
	res := writeBatch(t, w,
		order("u1", 1, key("k")), order("u2", 2, nil), order("u1", 1, key("k")), order("u1", 3, key("k")))
	if !res[0].Created || res[0].Err != nil || !res[1].Created {
		t.Fatalf("new orders: %+v %+v", res[0], res[1])
	}
	if res[2].Created || res[2].Err != nil || res[2].Order.ID != res[0].Order.ID {
		t.Errorf("replay in the same batch: %+v, want order %s", res[2], res[0].Order.ID)
	}
	if !errors.Is(res[3].Err, errIdempotencyConflict) {
		t.Errorf("key reused with another body: %+v, want a conflict", res[3])
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox`); n != 2 {
		t.Errorf("%d outbox rows, want 2", n)
	}
	if n := announced.Load(); n != 1 {
		t.Errorf("the batch's commit announced new outbox rows %d times, want 1", n)
	}
	// A batch of replays writes no event, and wakes no relay.
	before := announced.Load()
	if res := writeBatch(t, w, order("u1", 1, key("k"))); res[0].Created || res[0].Err != nil {
		t.Errorf("replay alone: %+v", res[0])
	}
	if n := announced.Load(); n != before {
		t.Errorf("a commit without new outbox rows announced them")
	}

	// One row the database rejects (amount 0 passes no CHECK) must not
	// fail the requests that share its batch.
	res = writeBatch(t, w, order("u3", 5, nil), order("u3", 0, nil), order("u3", 6, nil))
	if !res[0].Created || !res[2].Created || res[1].Err == nil || res[1].Created {
		t.Errorf("batch with one bad row: %+v", res)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE user_id = 'u3'`); n != 2 {
		t.Errorf("%d orders for u3, want 2", n)
	}
}

// The consumer's UPDATE of orders by id keeps to the primary key however its
// plan was cached. PostgreSQL caches a generic plan after a statement's
// fifth run on a connection; made while orders is small, that plan is a
// sequential scan, and it stays as the table grows until the next ANALYZE.
// The test applies results while the table holds a few orders, adds 100 000
// without ANALYZE, applies more, and reads how many rows sequential scans of
// orders read: one such scan would read all of them. The counters reach
// pg_stat_user_tables when the server processes flush them (within about 10
// s of going idle); the orders the consumer updated are counted in the same
// flush, so the test waits for those.
func TestPaymentResultsKeepToTheIndexAsOrdersGrow(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	// One connection: every run of the statement is on it, and so is the
	// plan it caches.
	s := startService(t, serviceEnv(withParam(dbURL, "pool_max_conns", "1"), b))
	user := newUser()
	applied := 0
	pay := func(id string) {
		t.Helper()
		produce(t, b, b.topic(topicPaymentResults), id, `{"order_id": "`+id+`", "status": "PAID"}`)
		applied++
		waitFor(t, 10*time.Second, "payment result applied", func() bool {
			return metric(t, s.url, `payment_results_applied_total{status="PAID"}`) == float64(applied)
		})
	}
	// One result at a time: each is its own statement, run enough times for
	// its plan to be cached while the table is small.
	for range 8 {
		pay(s.createOrder(t, user, 1).ID)
	}
	seedOrders(t, dbURL, 100_000)
	rows, err := schemaPool(t, dbURL).Query(context.Background(), `SELECT id::text FROM orders WHERE user_id = 'seed' LIMIT 12`)
	if err != nil {
		t.Fatal(err)
	}
	seeded, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range seeded {
		pay(id)
	}
	waitFor(t, 30*time.Second, "the consumer's statistics flushed", func() bool {
		return tableStat(t, dbURL, "orders", "n_tup_upd") >= applied
	})
	if read := tableStat(t, dbURL, "orders", "seq_tup_read"); read >= 100_000 {
		t.Errorf("sequential scans read %d rows of orders: the consumer's plan scanned the whole table", read)
	}
}

// More orders than the writers can take: the queue holds CREATE_QUEUE_MAX and
// whatever arrives past it is refused at once, 503 with Retry-After, nothing
// stored; the queued ones are written once a writer is free. A queued request
// whose time runs too short while it waits is answered 503 before it joins a
// batch, rather than give the batch its deadline. The one writer is held by a
// lock the test owns: its request waits on the test's uncommitted row with the
// same Idempotency-Key.
func TestOverloadIsRefusedAtOnce(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	const queueMax = 4
	env := serviceEnv(dbURL, b)
	env["CREATE_WRITERS"], env["CREATE_BATCH_MAX"], env["CREATE_QUEUE_MAX"] = "1", "1", strconv.Itoa(queueMax)
	s := startService(t, env)
	user := newUser()
	hold := func(key string) pgx.Tx {
		tx, err := schemaPool(t, dbURL).Begin(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tx.Rollback(context.Background()) }) //nolint:errcheck // a no-op once released
		if _, err := tx.Exec(context.Background(), `INSERT INTO orders (id, user_id, amount, idempotency_key, request_hash)
			VALUES ($1, $2, 1, $3, '\x00')`, newUUID(), user, key); err != nil {
			t.Fatal(err)
		}
		return tx
	}
	// post sends n orders at once, after the one the writer is held on, and
	// returns their answers and how long each took.
	type answer struct {
		r    response
		took time.Duration
	}
	post := func(phase string, n int, release func()) (held response, answers []answer) {
		heldDone := make(chan response, 1)
		go func() {
			heldDone <- do(t, "POST", s.url+"/orders", `{"amount": 1}`, "X-User-Id", user, "Idempotency-Key", phase+"-held")
		}()
		waitFor(t, 5*time.Second, "the writer held on the lock", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM pg_locks WHERE NOT granted`) > 0
		})
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				start := time.Now()
				r := do(t, "POST", s.url+"/orders", `{"amount": 2}`, "X-User-Id", user, "Idempotency-Key", fmt.Sprint(phase, i))
				mu.Lock()
				answers = append(answers, answer{r, time.Since(start)})
				mu.Unlock()
			})
			if i < queueMax { // the first ones take the queue's places, in order
				waitFor(t, 5*time.Second, "a request queued", func() bool { return metric(t, s.url, "order_queue_waiting") == float64(i+1) })
			}
		}
		released := make(chan struct{})
		go func() {
			defer close(released)
			release()
		}()
		wg.Wait()
		<-released
		return <-heldDone, answers
	}

	// Held 0.5 s: the queued orders are written, the rest refused at once.
	first := hold("first-held")
	held, answers := post("first", queueMax+6, func() { time.Sleep(500 * time.Millisecond); first.Rollback(context.Background()) }) //nolint:errcheck // the test's own row
	if held.status != http.StatusCreated {
		t.Errorf("the held request: %d %s", held.status, held.body)
	}
	var created, refused int
	for _, a := range answers {
		switch {
		case a.r.status == http.StatusCreated:
			created++
		case a.r.status == http.StatusServiceUnavailable && a.r.header.Get("Retry-After") != "" && a.took < 200*time.Millisecond:
			refused++
		default:
			t.Errorf("an order answered %d after %s: %s", a.r.status, a.took, a.r.body)
		}
	}
	if created != queueMax || refused != 6 {
		t.Errorf("%d created and %d refused at once, want %d and 6", created, refused, queueMax)
	}
	if got := metric(t, s.url, `orders_refused_total{reason="queue_full"}`); got != 6 {
		t.Errorf(`orders_refused_total{reason="queue_full"} %v, want 6`, got)
	}

	// Held 2.2 s: the queued requests have under minWriteTime left when the
	// writer is free, and are answered 503 without being written.
	second := hold("second-held")
	_, answers = post("second", queueMax, func() {
		time.Sleep(requestDBTimeout - minWriteTime + 200*time.Millisecond)
		second.Rollback(context.Background()) //nolint:errcheck // as above
	})
	for _, a := range answers {
		if a.r.status != http.StatusServiceUnavailable || a.r.header.Get("Retry-After") == "" || a.took > requestDBTimeout {
			t.Errorf("a request queued past its time: %d after %s, want 503 within %s: %s", a.r.status, a.took, requestDBTimeout, a.r.body)
		}
	}
	if got := metric(t, s.url, `orders_refused_total{reason="late"}`); got != queueMax {
		t.Errorf(`orders_refused_total{reason="late"} %v, want %d`, got, queueMax)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE idempotency_key LIKE 'second_'`); n != 0 {
		t.Errorf("%d of the orders answered 503 were written", n)
	}
}
