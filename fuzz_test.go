package main

// Fuzz targets for the places where outside bytes enter the service: the
// POST /orders body and a payment-results value, the latter both decoded
// alone and sent through the whole apply path (database and DLQ included).
// Seeds are added in code and in testdata/fuzz, and run with every `go test`;
// .ci/run fuzzes each target briefly.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Any body is either refused with a 400 or 413 problem that says why, or
// accepted as a valid order whose amount is exactly the number sent.
func FuzzDecodeOrderInput(f *testing.F) {
	for _, seed := range []string{
		`{"amount": 1500, "description": "Книга"}`, `{"amount": 1}`, `{"amount": 0}`, `{"amount": -5}`,
		`{"amount": 9223372036854775808}`, `{"amount": 1.5}`, `{"amount": "1"}`, `{"amount": 1, "extra": true}`,
		`{"amount": 1, "description": "a\u0000b"}`, "{\"amount\": 1, \"description\": \"\xff\"}", `{"amount": 1}{}`,
		`[]`, `null`, ``, strings.Repeat("[", 20000),
		`{"amount": 1, "amount": 2}`, `{"amount": 1, "description": null}`,
		`{"amount": 1500.0}`, `{"amount": 1.5e3}`, `{"amount": 15e-1}`, `{"amount": 1e999999999}`,
		`{"amount": 9.223372036854775807e18}`, `{"amount": 9.223372036854775808e18}`, `{"amount": -0.0}`,
		`{"Amount": 1}`, `{"amount": 1, "deſcription": "x"}`, `{"amount": 1, "description": "\ud800"}`,
		`{"amount": 1, "description": "\ud83d\ude00 \\ud800"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		in, p := decodeOrderInput(http.MaxBytesReader(nil, io.NopCloser(bytes.NewReader(body)), maxBodyBytes))
		if p != nil {
			if p.Status != http.StatusBadRequest && p.Status != http.StatusRequestEntityTooLarge || p.Detail == "" {
				t.Fatalf("rejection %+v", p)
			}
			return
		}
		if in.Amount <= 0 || utf8.RuneCountInString(in.Description) > maxDescription ||
			!utf8.ValidString(in.Description) || strings.ContainsRune(in.Description, 0) {
			t.Fatalf("accepted an invalid order %+v from %q", in, body)
		}
		// The amount is the exact value of the number sent, however written.
		var raw struct{ Amount json.Number }
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&raw); err == nil && len(raw.Amount) < 64 {
			sent, ok := new(big.Rat).SetString(string(raw.Amount))
			if !ok || sent.Cmp(new(big.Rat).SetInt64(in.Amount)) != 0 {
				t.Fatalf("amount %s accepted as %d", raw.Amount, in.Amount)
			}
		}
		// What was accepted, sent again, is accepted as the same order.
		again, _ := json.Marshal(map[string]any{"amount": in.Amount, "description": in.Description})
		in2, p2 := decodeOrderInput(bytes.NewReader(again))
		if p2 != nil || in2 != in {
			t.Fatalf("round trip of %+v: %+v, %+v", in, in2, p2)
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

// deadLetteredTotal is every record the consumer sent to the DLQ, whatever
// the reason.
func deadLetteredTotal(m *metrics) (n int64) {
	for i := range m.deadLettered {
		n += m.deadLettered[i].Load()
	}
	return n
}
