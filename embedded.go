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

// demoPayments stands in for the Payment Service: it answers every pay-order
// event on payment-results, in its own consumer group, committing only after
// its answers are written.
func demoPayments(ctx context.Context, brokers []string, payOrderTopic, resultsTopic, group string, log *slog.Logger) error {
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
	for {
		fetches := cl.PollFetches(ctx)
		if fetches.IsClientClosed() || ctx.Err() != nil {
			return nil
		}
		var answers []*kgo.Record
		fetches.EachRecord(func(rec *kgo.Record) {
			var ev struct {
				OrderID string `json:"order_id"`
				Amount  int64  `json:"amount"`
			}
			if err := json.Unmarshal(rec.Value, &ev); err != nil {
				log.WarnContext(ctx, "demo payments: skipping undecodable pay-order", "offset", rec.Offset, "err", err)
				return
			}
			res := map[string]string{"order_id": ev.OrderID, "status": "PAID"}
			if ev.Amount > demoPaymentLimit {
				res["status"] = "FAILED"
				res["reason"] = fmt.Sprintf("amount %d exceeds the demo limit of %d", ev.Amount, demoPaymentLimit)
			}
			b, _ := json.Marshal(res)
			answer := &kgo.Record{Topic: resultsTopic, Key: rec.Key, Value: b}
			// As a traced Payment Service would: the answer continues the
			// order's trace, as a span of its own.
			for _, h := range rec.Headers {
				if h.Key != "traceparent" {
					continue
				}
				if t, ok := parseTraceparent(string(h.Value)); ok {
					answer.Headers = append(answer.Headers, kgo.RecordHeader{Key: "traceparent", Value: []byte(hop(t, true).String())})
				}
			}
			answers = append(answers, answer)
		})
		if len(answers) == 0 {
			continue
		}
		// The fetch position has moved past these events: retry the
		// answers here, or they would be lost until a restart.
		retry(ctx, func(ctx context.Context) error { //nolint:errcheck // only ctx's end stops it
			return cl.ProduceSync(ctx, answers...).FirstErr()
		}, func(err error, wait time.Duration) bool {
			log.WarnContext(ctx, "demo payments: answer failed, retrying", "err", err, "retry_in", wait)
			return true
		})
		if ctx.Err() != nil {
			return nil
		}
		if err := cl.CommitUncommittedOffsets(ctx); err != nil && ctx.Err() == nil {
			log.WarnContext(ctx, "demo payments: commit failed", "err", err)
		}
	}
}
