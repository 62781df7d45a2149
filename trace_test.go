package main

// W3C Trace Context: the header's rules, and one request's trace followed
// from HTTP through the outbox into pay-order and back from payment-results.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// traceparent is read as W3C Trace Context says (a later version read as 00,
// a malformed header refused), and what the service writes is valid and
// continues the trace it got.
func TestTraceparentFollowsW3CRules(t *testing.T) {
	const (
		trace = "4bf92f3577b34da6a3ce929d0e0e4736"
		span  = "00f067aa0ba902b7"
	)
	valid := []string{
		"00-" + trace + "-" + span + "-01",
		"00-" + trace + "-" + span + "-00",
		"01-" + trace + "-" + span + "-01",                 // a later version: read as 00
		"cc-" + trace + "-" + span + "-01-what-the-future", // with fields 00 does not know
	}
	invalid := []string{
		"",
		"00-" + trace + "-" + span + "-01-", // version 00 has nothing after the flags
		"00-" + strings.ToUpper(trace) + "-" + span + "-01", // uppercase hex
		"00-" + trace + "-" + strings.ToUpper(span) + "-01",
		"00-00000000000000000000000000000000-" + span + "-01", // all-zero trace id
		"00-" + trace + "-0000000000000000-01",                // all-zero parent id
		"ff-" + trace + "-" + span + "-01",                    // version ff is invalid
		"0-" + trace + "-" + span + "-01",                     // short version
		"00-" + trace[1:] + "-" + span + "-01",                // short trace id
		"00-" + trace + "-" + span[1:] + "-01",                // short parent id
		"00-" + trace + "-" + span + "-1",                     // short flags
		"00-" + trace + "-" + span + "-0g",                    // not hex
		"00_" + trace + "_" + span + "_01",                    // wrong separators
		"01-" + trace + "-" + span + "-01x",                   // a later version's extra fields need a '-'
	}
	for _, s := range valid {
		tp, ok := parseTraceparent(s)
		if !ok {
			t.Errorf("%q refused", s)
			continue
		}
		if tp.traceID() != trace || fmt.Sprintf("%x", tp.SpanID) != span {
			t.Errorf("%q read as %s", s, tp)
		}
	}
	for _, s := range invalid {
		if _, ok := parseTraceparent(s); ok {
			t.Errorf("%q accepted", s)
		}
	}

	// What this service writes is valid, and continues the trace it got.
	in, _ := parseTraceparent("00-" + trace + "-" + span + "-01")
	out := hop(in, true).String()
	if !regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`).MatchString(out) {
		t.Fatalf("hop %q", out)
	}
	if tp, ok := parseTraceparent(out); !ok || tp.traceID() != trace || tp.SpanID == in.SpanID || tp.Flags != 1 {
		t.Errorf("hop of %s is %s", in, out)
	}
	// A new trace has random, non-zero ids.
	for range 100 {
		if _, ok := parseTraceparent(hop(traceParent{}, false).String()); !ok {
			t.Fatal("a new trace is not a valid traceparent")
		}
	}
	if cleanTracestate(strings.Repeat("a=b,", 200)) != "" || cleanTracestate("a=b\x00") != "" || cleanTracestate(" congo=t61 ") != "congo=t61" {
		t.Error("tracestate cleaning")
	}
}

// jsonLogLine finds the service's JSON log line with msg and order_id.
func jsonLogLine(t *testing.T, s *service, msg, orderID string) map[string]any {
	t.Helper()
	var found map[string]any
	waitFor(t, 10*time.Second, fmt.Sprintf("log line %q for %s", msg, orderID), func() bool {
		for _, line := range strings.Split(s.logs.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg && m["order_id"] == orderID {
				found = m
				return true
			}
		}
		return false
	})
	return found
}

// payOrderRecord reads the pay-order record of an order.
func payOrderRecordOf(t *testing.T, b *broker, orderID string) *kgo.Record {
	t.Helper()
	var rec *kgo.Record
	readTopic(t, b, b.topic(topicPayOrder), 10*time.Second, func(recs []*kgo.Record) bool {
		for _, r := range recs {
			if string(r.Key) == orderID {
				rec = r
				return true
			}
		}
		return false
	})
	return rec
}

// A request's trace crosses the outbox: its trace id reaches the log, the
// outbox row and the pay-order record (with this service's span as parent,
// tracestate kept), and the payment result's trace reaches the log of the
// status change.
func TestTraceContextCrossesTheOutbox(t *testing.T) {
	b, _, s := startStackWith(t, map[string]string{
		"LOG_FORMAT": "json",
	})
	user := newUser()
	const (
		trace  = "4bf92f3577b34da6a3ce929d0e0e4736"
		parent = "00f067aa0ba902b7"
	)

	// A traced request: its trace reaches the log, the outbox and pay-order.
	r := do(t, "POST", s.url+"/orders", `{"amount": 1500}`, "X-User-Id", user,
		"traceparent", "00-"+trace+"-"+parent+"-01", "tracestate", "congo=t61rcWkgMzE", "X-Request-Id", "req-42")
	if r.status != http.StatusCreated || r.header.Get("X-Request-Id") != "req-42" {
		t.Fatalf("POST: %d, X-Request-Id %q", r.status, r.header.Get("X-Request-Id"))
	}
	o := r.order(t)
	if l := jsonLogLine(t, s, "order created", o.ID); l["trace_id"] != trace || l["request_id"] != "req-42" {
		t.Errorf("request log line %v: want trace_id %s, request_id req-42", l, trace)
	}
	rec := payOrderRecordOf(t, b, o.ID)
	tp, ok := parseTraceparent(headerMap(rec)["traceparent"])
	if !ok || tp.traceID() != trace || fmt.Sprintf("%x", tp.SpanID) == parent || tp.Flags != 1 {
		t.Errorf("pay-order traceparent %q: want trace %s with this service's span as parent, not the caller's %s",
			headerMap(rec)["traceparent"], trace, parent)
	}
	if ts := headerMap(rec)["tracestate"]; ts != "congo=t61rcWkgMzE" {
		t.Errorf("pay-order tracestate %q", ts)
	}

	// The Payment Service answers in the same trace: the status change is
	// logged with it.
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	answer := hop(tp, true).String()
	if err := cl.ProduceSync(context.Background(), &kgo.Record{
		Topic: b.topic(topicPaymentResults), Key: []byte(o.ID),
		Value:   []byte(fmt.Sprintf(`{"order_id": %q, "status": "PAID"}`, o.ID)),
		Headers: []kgo.RecordHeader{{Key: "traceparent", Value: []byte(answer)}},
	}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if l := jsonLogLine(t, s, "order status changed", o.ID); l["trace_id"] != trace {
		t.Errorf("status change log line %v: want trace_id %s", l, trace)
	}

	// A malformed traceparent starts a new trace; no X-Request-Id gets one.
	r = do(t, "POST", s.url+"/orders", `{"amount": 1500}`, "X-User-Id", user,
		"traceparent", "00-"+strings.ToUpper(trace)+"-"+parent+"-01", "tracestate", "dropped=1")
	if r.status != http.StatusCreated || !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(r.header.Get("X-Request-Id")) {
		t.Fatalf("POST: %d, X-Request-Id %q", r.status, r.header.Get("X-Request-Id"))
	}
	o2 := r.order(t)
	rec = payOrderRecordOf(t, b, o2.ID)
	tp2, ok := parseTraceparent(headerMap(rec)["traceparent"])
	if !ok || tp2.traceID() == trace || headerMap(rec)["tracestate"] != "" {
		t.Errorf("pay-order after a malformed traceparent: traceparent %q, tracestate %q; want a new trace, no tracestate",
			headerMap(rec)["traceparent"], headerMap(rec)["tracestate"])
	}
	if l := jsonLogLine(t, s, "order created", o2.ID); l["trace_id"] != tp2.traceID() || l["request_id"] != r.header.Get("X-Request-Id") {
		t.Errorf("request log line %v: want the new trace %s and request id %s", l, tp2.traceID(), r.header.Get("X-Request-Id"))
	}
}
