package main

// payments_test.go: payment results are applied once, whatever comes and
// however often; what can never apply goes to the DLQ and blocks nothing.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

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

// A payment result is applied once; duplicates and conflicting results change
// nothing; offsets are committed only after the database.
func TestPaymentResultsApplyOnceAndCommitOffsets(t *testing.T) {
	b, _, s := startStack(t)
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
	b, _, s := startStack(t)
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

// A hostile Payment Service, all on one partition, ahead of a valid result:
// every record is applied or dead-lettered, and the valid one behind them all
// is applied.
func TestHostilePaymentResultsNeverStopTheConsumer(t *testing.T) {
	b, _, s := startStack(t)
	user := newUser()
	var o [6]Order
	for i := range o {
		o[i] = s.createOrder(t, user, int64(10+i))
	}
	key := o[0].ID // one key: one partition, in this order
	result := func(v string) *kgo.Record {
		return &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(key), Value: []byte(v)}
	}
	hugeReason := strings.Repeat("ж", 300_000) // 600 KB
	recs := []*kgo.Record{
		// Values that only need cleaning are applied (see decodePaymentResult).
		result(`{"order_id": "` + o[0].ID + `", "status": "FAILED", "reason": "card\u0000declined"}`),
		result(`{"order_id": "` + o[1].ID + "\", \"status\": \"FAILED\", \"reason\": \"bad \xff\xfe bytes \\u0001\\u001b ctl\"}"),
		result(`{"order_id": "` + o[3].ID + `", "status": "FAILED", "reason": "` + hugeReason + `"}`),
		// Poison.
		result(`{"order_id": "` + o[2].ID + `", "status": "FAILED", "status": "PAID"}`),  // which one did the sender mean?
		result(`{"order_id": "` + o[2].ID + `", "STATUS": "PAID"}`),                      // encoding/json would read it as status
		result(`{"order_id": "` + strings.Repeat("x", 600_000) + `", "status": "PAID"}`), // its error would quote 600 KB
		result(strings.Repeat("[", 20_000) + strings.Repeat("]", 20_000)),                // nested 20 000 deep
		result(`{"order_id": 42, "status": "PAID"}`),                                     // a number where a string belongs
		result(`{"order_id": "` + o[4].ID + `", "status": ["PAID"]}`),
		result(`{"order_id": "` + o[4].ID + `", "status": "REFUNDED", "junk": "` + strings.Repeat("y", 1_040_000) + `"}`), // its DLQ copy cannot fit
		// The valid result behind them all.
		result(`{"order_id": "` + o[5].ID + `", "status": "PAID"}`),
	}
	const firstPoison, poison = 3, 7
	produceRecords(t, b, recs...)

	waitFor(t, 20*time.Second, "the valid result behind the poison applied", func() bool {
		return s.getOrder(t, user, o[5].ID).Status == "PAID"
	})
	waitCommitted(t, b)
	got := make([]Order, len(o))
	for i := range o {
		got[i] = s.getOrder(t, user, o[i].ID)
	}
	reason := func(o Order) string {
		if o.FailureReason == nil {
			return "<nil>"
		}
		return *o.FailureReason
	}
	if got[0].Status != "FAILED" || reason(got[0]) != "card\uFFFDdeclined" {
		t.Errorf("NUL in reason: %s %q, want FAILED with the NUL replaced by U+FFFD", got[0].Status, reason(got[0]))
	}
	if got[1].Status != "FAILED" || reason(got[1]) != "bad \uFFFD\uFFFD bytes \x01\x1b ctl" {
		t.Errorf("invalid UTF-8 and control characters: %s %q", got[1].Status, reason(got[1]))
	}
	if got[2].Status != "PENDING" {
		t.Errorf("duplicate key, wrongly cased key: %s, want PENDING (both dead-lettered)", got[2].Status)
	}
	if r := reason(got[3]); got[3].Status != "FAILED" || utf8.RuneCountInString(r) != maxReason || r != hugeReason[:2*maxReason] {
		t.Errorf("600 KB reason: %s, %d characters stored, want FAILED and the first %d", got[3].Status, utf8.RuneCountInString(r), maxReason)
	}
	if got[4].Status != "PENDING" {
		t.Errorf("order behind two poison records: %s, want PENDING", got[4].Status)
	}

	dlq := readTopic(t, b, b.topic(topicPaymentDLQ), 20*time.Second, func(r []*kgo.Record) bool { return len(r) >= poison })
	if len(dlq) != poison {
		t.Fatalf("DLQ has %d records, want %d", len(dlq), poison)
	}
	for i, r := range dlq {
		h := headerMap(r)
		orig := recs[firstPoison+i]
		if h["original-offset"] != fmt.Sprint(orig.Offset) || h["error"] == "" || len(h["error"]) > maxErrorHeader+len("…") {
			t.Errorf("DLQ record %d: original-offset %s (want %d), error header of %d bytes", i, h["original-offset"], orig.Offset, len(h["error"]))
		}
		if i < poison-1 && (!bytes.Equal(r.Value, orig.Value) || h["truncated"] != "") {
			t.Errorf("DLQ record %d: value of %d bytes (original %d), truncated %q; want the original", i, len(r.Value), len(orig.Value), h["truncated"])
		}
	}
	last := dlq[poison-1]
	if h := headerMap(last); h["truncated"] == "" || !bytes.Equal(last.Value, recs[firstPoison+poison-1].Value[:truncatedBytes]) {
		t.Errorf("oversized DLQ copy: %d bytes, headers %v; want its first %d bytes and a truncated header", len(last.Value), h, truncatedBytes)
	}
	if n := metric(t, s.url, `payment_results_dlq_total{reason="invalid"}`) + metric(t, s.url, `payment_results_dlq_total{reason="unknown_order"}`) +
		metric(t, s.url, `payment_results_dlq_total{reason="refused"}`); n != poison {
		t.Errorf("payment_results_dlq_total %v, want %d", n, poison)
	}
}

// A value the database itself refuses (here a CHECK constraint the test adds;
// SQLSTATE 23514) is one record's fault: that record alone goes to the DLQ and
// the rest of its poll is applied.
func TestRecordTheDatabaseRefusesIsDeadLetteredAlone(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	s := startService(t, env)
	user := newUser()
	var ids []string
	for range 6 {
		ids = append(ids, s.createOrder(t, user, 5).ID)
	}
	if err := s.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := schemaPool(t, dbURL).Exec(context.Background(),
		`ALTER TABLE orders ADD CONSTRAINT test_refuses CHECK (failure_reason IS DISTINCT FROM 'refused')`); err != nil {
		t.Fatal(err)
	}
	// Produced while no consumer runs, on one partition: the restarted
	// service reads them in one poll, and applies them in one transaction.
	var recs []*kgo.Record
	refused := map[int]bool{1: true, 4: true}
	for i, id := range ids {
		v := `{"order_id": "` + id + `", "status": "FAILED", "reason": "ok"}`
		if refused[i] {
			v = `{"order_id": "` + id + `", "status": "FAILED", "reason": "refused"}`
		}
		recs = append(recs, &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(ids[0]), Value: []byte(v)})
	}
	produceRecords(t, b, recs...)
	s2 := startService(t, env)
	waitCommitted(t, b)
	for i, id := range ids {
		want := "FAILED"
		if refused[i] {
			want = "PENDING"
		}
		if got := s2.getOrder(t, user, id).Status; got != want {
			t.Errorf("order %d: %s, want %s", i, got, want)
		}
	}
	dlq := readTopicNow(t, b, b.topic(topicPaymentDLQ))
	if len(dlq) != 2 {
		t.Fatalf("DLQ has %d records, want the 2 refused", len(dlq))
	}
	for i, r := range dlq {
		h := headerMap(r)
		if want := []string{"1", "4"}[i]; h["original-offset"] != want || !strings.Contains(h["error"], "23514") {
			t.Errorf("DLQ record %d: offset %s (want %s), error %q", i, h["original-offset"], want, h["error"])
		}
	}
	if n := metric(t, s2.url, `payment_results_dlq_total{reason="refused"}`); n != 2 {
		t.Errorf(`payment_results_dlq_total{reason="refused"} %v, want 2`, n)
	}
}

// Any record value is either refused as poison (for the DLQ, never retried) or
// accepted as a valid result: a UUID order id, PAID or FAILED, a reason only
// with FAILED.
func FuzzDecodePaymentResult(f *testing.F) {
	for _, seed := range paymentResultSeeds {
		f.Add([]byte(strings.ReplaceAll(seed, "ORDER", "01890000-0000-7000-8000-0000000000aa")))
	}
	f.Fuzz(func(t *testing.T, value []byte) {
		res, err := decodePaymentResult(value)
		if err != nil {
			if !errors.Is(err, errPoison) {
				t.Fatalf("rejection %v is not marked poison: it would be retried forever", err)
			}
			return
		}
		if !isUUID(res.OrderID) || res.Status != "PAID" && res.Status != "FAILED" || res.Status == "PAID" && res.Reason != nil {
			t.Fatalf("accepted %+v from %q", res, value)
		}
	})
}

// FuzzApplyPaymentResult sends each value through the consumer's real path:
// decode, apply in PostgreSQL, and the DLQ on an in-process broker. Whatever
// the value, the poll completes (nothing is retried forever as if it were
// transient) and the record is accounted for exactly once: applied, ignored,
// or dead-lettered. ORDER in a value becomes the id of a real PENDING order.
func FuzzApplyPaymentResult(f *testing.F) {
	for _, seed := range paymentResultSeeds {
		f.Add([]byte(seed))
	}
	ctx := context.Background()
	dbURL := newSchema(f)
	db := schemaPool(f, dbURL)
	if err := applySchema(ctx, db); err != nil {
		f.Fatal(err)
	}
	res, err := createOrders(ctx, db, "pay-order", []newOrder{{ID: newUUID(), UserID: "fuzz", Amount: 1}})
	if err != nil {
		f.Fatal(err)
	}
	orderID := res[0].Order.ID
	b := newBroker(f, true)
	producer, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(producer.Close)
	c := &consumer{db: db, producer: producer, dlqTopic: b.topic(topicPaymentDLQ),
		log: slog.New(slog.DiscardHandler), metrics: newMetrics()}
	var offset int64

	f.Fuzz(func(t *testing.T, value []byte) {
		if _, err := db.Exec(ctx, `UPDATE orders SET status = 'PENDING', failure_reason = NULL WHERE id = $1`, orderID); err != nil {
			t.Fatal(err)
		}
		value = bytes.ReplaceAll(value, []byte("ORDER"), []byte(orderID))
		offset++
		rec := &kgo.Record{Topic: b.topic(topicPaymentResults), Offset: offset, Key: []byte(orderID), Value: value}
		before := c.metrics.resultsPaid.Load() + c.metrics.resultsFailed.Load() + c.metrics.resultsIgnored.Load() +
			deadLetteredTotal(c.metrics)
		pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		if err := c.processPoll(pctx, []*kgo.Record{rec}); err != nil {
			t.Fatalf("the poll did not complete (%v): %q would stop the consumer", err, clip(string(value), 200))
		}
		after := c.metrics.resultsPaid.Load() + c.metrics.resultsFailed.Load() + c.metrics.resultsIgnored.Load() +
			deadLetteredTotal(c.metrics)
		if after-before != 1 {
			t.Fatalf("%q accounted for %d times, want once", clip(string(value), 200), after-before)
		}
		var status string
		var reason *string
		if err := db.QueryRow(ctx, `SELECT status, failure_reason FROM orders WHERE id = $1`, orderID).Scan(&status, &reason); err != nil {
			t.Fatal(err)
		}
		if reason != nil && (status != "FAILED" || utf8.RuneCountInString(*reason) > maxReason || !utf8.ValidString(*reason)) {
			t.Fatalf("%q stored %s with reason %q", clip(string(value), 200), status, clip(*reason, 200))
		}
	})
}

// paymentResultSeeds are hostile payment-results values; ORDER stands for
// the id of a real order in FuzzApplyPaymentResult.
var paymentResultSeeds = []string{
	`{"order_id": "ORDER", "status": "PAID"}`,
	`{"order_id": "ORDER", "status": "FAILED", "reason": "card declined"}`,
	`{"order_id": "ORDER", "status": "FAILED", "reason": "nul\u0000inside"}`,
	`{"order_id": "ORDER", "status": "FAILED", "reason": "ctl \u0001\u001b\u007f"}`,
	"{\"order_id\": \"ORDER\", \"status\": \"FAILED\", \"reason\": \"bad \xff\xfe utf-8\"}",
	`{"order_id": "ORDER", "status": "FAILED", "reason": "` + strings.Repeat("long ", 2000) + `"}`,
	`{"order_id": "ORDER", "status": "FAILED", "status": "PAID"}`,
	`{"order_id": "ORDER", "STATUS": "PAID"}`,
	`{"order_id": "ORDER", "status": "PAID", "extra": {"a": 1, "a": 2}}`,
	`{"order_id": "ORDER", "status": "FAILED", "reason": "\ud800"}`,
	`{"order_id": "ORDER", "status": "PAID", "reason": 42}`,
	`{"order_id": 42, "status": "PAID"}`,
	`{"order_id": "ORDER", "status": "paid"}`,
	`{"order_id": "ORDER", "status": "REFUNDED"}`,
	`{"order_id": "01890000-0000-7000-8000-000000000000", "status": "PAID"}`,
	`{"order_id": "` + strings.Repeat("x", 100000) + `", "status": "PAID"}`,
	strings.Repeat("[", 20000) + strings.Repeat("]", 20000),
	`{"order_id": "ORDER", "status": "PAID"`,
	`null`, ``, `[]`, `"ORDER"`,
}

// deadLetteredTotal is every record the consumer sent to the DLQ, whatever
// the reason.
func deadLetteredTotal(m *metrics) (n int64) {
	for i := range m.deadLettered {
		n += m.deadLettered[i].Load()
	}
	return n
}
