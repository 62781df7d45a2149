package main

// embedded.go is what makes `go run .` work with no Kafka installed: an
// embedded Kafka-protocol broker (kfake) and a stand-in Payment Service. Neither runs
// when KAFKA_BROKERS points at a real cluster (unless DEMO_PAYMENTS=true).

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// demoPaymentLimit is the largest amount (minor units) the demo responder
// pays; anything above FAILS, so a curl user can see both outcomes.
const demoPaymentLimit = 100_000

// startEmbeddedKafka starts a one-broker kfake cluster on addr whose log is
// kept in dir, so restarting `go run .` loses no message.
func startEmbeddedKafka(addr, dir string) (*kfake.Cluster, error) {
	c, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) { return net.Listen(network, addr) }),
		kfake.DataDir(dir),
	)
	if err != nil {
		return nil, fmt.Errorf("embedded kafka on %s (data %s): %w", addr, dir, err)
	}
	return c, nil
}

// demoInboxKeep is how long the demo Payment Service remembers an event it
// handled: pay-order's retention (Kafka's default, 7 days), past which the
// event cannot be redelivered.
const demoInboxKeep = 7 * 24 * time.Hour

// demoPayments stands in for the Payment Service: it answers every pay-order
// event on payment-results, in its own consumer group, committing only after
// its answers are written. It dedupes as a real one must: each event's
// decision is stored in its inbox (demo_payment_inbox) before it is
// answered, and an event that comes again (pay-order is at least once) is
// answered with the decision stored, never decided, or charged, anew.
func demoPayments(ctx context.Context, db *pgxpool.Pool, brokers []string, payOrderTopic, resultsTopic, group string, log *slog.Logger) error {
	if err := retry(ctx, func(ctx context.Context) error { return createDemoInbox(ctx, db) }, func(err error, wait time.Duration) bool {
		log.WarnContext(ctx, "demo payments: inbox not ready, retrying", "err", err, "retry_in", wait)
		return true
	}); err != nil {
		return nil // shutdown came first
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service-demo-payments"),
		kgo.ConsumerGroup(group),
		kgo.ConsumeTopics(payOrderTopic),
		kgo.DisableAutoCommit(),
	)
	if err != nil {
		return fmt.Errorf("demo payments client: %w", err)
	}
	defer cl.Close()
	var purged time.Time
	for {
		fetches := cl.PollFetches(ctx)
		if fetches.IsClientClosed() || ctx.Err() != nil {
			return nil
		}
		if time.Since(purged) > time.Hour {
			if _, err := purgeDemoInbox(ctx, db, demoInboxKeep); err != nil {
				log.WarnContext(ctx, "demo payments: purge failed", "err", err)
			} else {
				purged = time.Now()
			}
		}
		events, traces := decideDemoPayments(ctx, fetches, log)
		if len(events) == 0 {
			continue
		}
		// The fetch position has moved past these events: retry here, or
		// they would be lost until a restart. Decided and stored first,
		// then answered: a crash between the two answers them when they
		// come again, as stored.
		var decided []demoPayment
		retry(ctx, func(ctx context.Context) error { //nolint:errcheck // only ctx's end stops it
			var err error
			decided, err = recordDemoPayments(ctx, db, events)
			return err
		}, func(err error, wait time.Duration) bool {
			log.WarnContext(ctx, "demo payments: inbox failed, retrying", "err", err, "retry_in", wait)
			return true
		})
		retry(ctx, func(ctx context.Context) error { //nolint:errcheck // only ctx's end stops it
			return cl.ProduceSync(ctx, demoAnswers(decided, traces, resultsTopic)...).FirstErr()
		}, func(err error, wait time.Duration) bool {
			log.WarnContext(ctx, "demo payments: answer failed, retrying", "err", err, "retry_in", wait)
			return true
		})
		if ctx.Err() != nil {
			return nil
		}
		for _, p := range decided {
			if p.Repeated {
				log.InfoContext(ctx, "demo payments: a pay-order event came again; answered as decided before",
					repeatsKey, "demo payments: repeated", "event_id", p.EventID, "order_id", p.OrderID, "status", p.Status)
			}
		}
		if err := cl.CommitUncommittedOffsets(ctx); err != nil && ctx.Err() == nil {
			log.WarnContext(ctx, "demo payments: commit failed", "err", err)
		}
	}
}

// decideDemoPayments decides each pay-order event of a poll: PAID up to
// demoPaymentLimit, FAILED above. An event id seen twice in the poll is
// decided once. traces holds each event's traceparent, to answer in its
// trace.
func decideDemoPayments(ctx context.Context, fetches kgo.Fetches, log *slog.Logger) (events []demoPayment, traces map[string]string) {
	traces = map[string]string{}
	seen := map[string]bool{}
	fetches.EachRecord(func(rec *kgo.Record) {
		var ev struct {
			EventID string `json:"event_id"`
			OrderID string `json:"order_id"`
			Amount  int64  `json:"amount"`
		}
		if err := json.Unmarshal(rec.Value, &ev); err != nil || !isUUID(ev.EventID) || !isUUID(ev.OrderID) {
			log.WarnContext(ctx, "demo payments: skipping undecodable pay-order", "offset", rec.Offset, "err", err)
			return
		}
		if seen[ev.EventID] {
			return
		}
		seen[ev.EventID] = true
		p := demoPayment{EventID: ev.EventID, OrderID: ev.OrderID, Status: "PAID"}
		if ev.Amount > demoPaymentLimit {
			reason := fmt.Sprintf("amount %d exceeds the demo limit of %d", ev.Amount, demoPaymentLimit)
			p.Status, p.Reason = "FAILED", &reason
		}
		for _, h := range rec.Headers {
			if h.Key == "traceparent" {
				traces[ev.EventID] = string(h.Value)
			}
		}
		events = append(events, p)
	})
	return events, traces
}

// demoAnswers are the payment-results records for decided events. As a
// traced Payment Service would, each continues its event's trace, as a span
// of its own.
func demoAnswers(decided []demoPayment, traces map[string]string, topic string) []*kgo.Record {
	var answers []*kgo.Record
	for _, p := range decided {
		res := map[string]any{"order_id": p.OrderID, "status": p.Status}
		if p.Reason != nil {
			res["reason"] = *p.Reason
		}
		b, _ := json.Marshal(res)
		answer := &kgo.Record{Topic: topic, Key: []byte(p.OrderID), Value: b}
		if t, ok := parseTraceparent(traces[p.EventID]); ok {
			answer.Headers = append(answer.Headers, kgo.RecordHeader{Key: "traceparent", Value: []byte(hop(t, true).String())})
		}
		answers = append(answers, answer)
	}
	return answers
}
