package main

// consumer.go applies payment-results to orders, each exactly once, and sends
// records it can never apply to the dead-letter topic.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

// paymentResult is a payment-results value. Unknown fields are accepted: the
// Payment Service may add some without breaking us.
type paymentResult struct {
	OrderID string  `json:"order_id"`
	Status  string  `json:"status"`
	Reason  *string `json:"reason"`
}

// errPoison marks a record that no retry can apply.
var errPoison = errors.New("poison record")

func decodePaymentResult(b []byte) (paymentResult, error) {
	var p paymentResult
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: malformed JSON: %v", errPoison, err)
	}
	p.OrderID = strings.ToLower(p.OrderID)
	if !isUUID(p.OrderID) {
		return p, fmt.Errorf("%w: order_id %q is not a UUID", errPoison, p.OrderID)
	}
	if p.Status != "PAID" && p.Status != "FAILED" {
		return p, fmt.Errorf("%w: unknown status %q", errPoison, p.Status)
	}
	if p.Status == "PAID" {
		p.Reason = nil
	}
	return p, nil
}

type consumer struct {
	db       *pgxpool.Pool
	group    *kgo.Client // consumes payment-results in the service's group
	producer *kgo.Client // writes the dead-letter topic
	dlqTopic string
	log      *slog.Logger
	metrics  *metrics
}

// newConsumerClient configures the group member. Offsets are committed only
// for marked records, and a record is marked only after the transaction that
// applied it has committed: a crash in between redelivers the record, and the
// conditional UPDATE makes that redelivery a no-op.
func newConsumerClient(brokers []string, group, topic string, log *slog.Logger, extra ...kgo.Opt) (*kgo.Client, error) {
	opts := []kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service"),
		kgo.ConsumerGroup(group),
		kgo.ConsumeTopics(topic),
		kgo.AutoCommitMarks(),
		// Polls and rebalances exclude each other, so a commit never
		// crosses a rebalance; run calls AllowRebalance after each poll.
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsRevoked(func(ctx context.Context, cl *kgo.Client, _ map[string][]int32) {
			// The new owner starts from what we commit here.
			if err := cl.CommitMarkedOffsets(ctx); err != nil {
				log.WarnContext(ctx, "consumer: commit on revoke failed", "err", err)
			}
		}),
		// OnPartitionsLost is left alone: the partitions are someone
		// else's already and a commit would fail or rewind theirs.
	}
	return kgo.NewClient(append(opts, extra...)...)
}

// run consumes until ctx is cancelled, then commits what it applied.
func (c *consumer) run(ctx context.Context) {
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := c.group.CommitMarkedOffsets(cctx); err != nil {
			c.log.WarnContext(ctx, "consumer: final commit failed", "err", err)
		}
	}()
	for {
		fetches := c.group.PollRecords(ctx, 1000)
		if fetches.IsClientClosed() || ctx.Err() != nil {
			c.group.AllowRebalance()
			return
		}
		fetches.EachError(func(topic string, p int32, err error) {
			c.log.WarnContext(ctx, "consumer: fetch error", "topic", topic, "partition", p, "err", err)
		})
		marked := 0
		for _, rec := range fetches.Records() {
			if err := c.handle(ctx, rec); err != nil {
				// Only shutdown stops handling; the record stays
				// unmarked and is redelivered to the next owner.
				break
			}
			c.group.MarkCommitRecords(rec)
			marked++
		}
		if marked > 0 {
			// Commit now rather than at the next autocommit tick: the
			// smaller the window, the fewer redeliveries after a crash.
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := c.group.CommitMarkedOffsets(cctx); err != nil && ctx.Err() == nil {
				c.log.WarnContext(ctx, "consumer: commit failed; autocommit will retry", "err", err)
			}
			cancel()
		}
		c.group.AllowRebalance()
	}
}

// handle applies one record, retrying transient failures (database down,
// DLQ unwritable) until it succeeds or ctx ends: skipping would lose it.
func (c *consumer) handle(ctx context.Context, rec *kgo.Record) error {
	for failures := 1; ; failures++ {
		err := c.process(ctx, rec)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := backoff(failures)
		c.log.WarnContext(ctx, "consumer: record not applied, retrying", "partition", rec.Partition,
			"offset", rec.Offset, "err", err, "retry_in", d)
		sleep(ctx, d)
	}
}

func (c *consumer) process(ctx context.Context, rec *kgo.Record) error {
	res, err := decodePaymentResult(rec.Value)
	if err != nil {
		return c.deadLetter(ctx, rec, err)
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	applied, err := applyPaymentResult(dctx, c.db, res.OrderID, res.Status, res.Reason)
	if err != nil {
		return err
	}
	if applied {
		c.metrics.resultsApplied(res.Status)
		c.log.InfoContext(ctx, "order status changed", "order_id", res.OrderID, "status", res.Status)
		return nil
	}
	current, err := orderStatus(dctx, c.db, res.OrderID)
	if errors.Is(err, errNotFound) {
		return c.deadLetter(ctx, rec, fmt.Errorf("%w: unknown order %s", errPoison, res.OrderID))
	}
	if err != nil {
		return err
	}
	if current == res.Status {
		c.log.InfoContext(ctx, "duplicate payment result ignored", "order_id", res.OrderID, "status", res.Status)
	} else {
		c.log.WarnContext(ctx, "conflicting payment result ignored", "order_id", res.OrderID,
			"status", current, "result", res.Status)
	}
	c.metrics.resultsIgnored.Add(1)
	return nil
}

// deadLetter copies the record to the DLQ with why and where it came from.
// The produce is synchronous: the record is marked only once the copy is safe.
func (c *consumer) deadLetter(ctx context.Context, rec *kgo.Record, cause error) error {
	headers := append([]kgo.RecordHeader{
		{Key: "error", Value: []byte(cause.Error())},
		{Key: "original-topic", Value: []byte(rec.Topic)},
		{Key: "original-partition", Value: []byte(strconv.Itoa(int(rec.Partition)))},
		{Key: "original-offset", Value: []byte(strconv.FormatInt(rec.Offset, 10))},
	}, rec.Headers...)
	dlq := &kgo.Record{Topic: c.dlqTopic, Key: rec.Key, Value: rec.Value, Headers: headers}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.producer.ProduceSync(pctx, dlq).FirstErr(); err != nil {
		return fmt.Errorf("dead-letter offset %d: %w", rec.Offset, err)
	}
	c.metrics.resultsDeadLettered.Add(1)
	c.log.WarnContext(ctx, "payment result sent to DLQ", "partition", rec.Partition, "offset", rec.Offset, "err", cause)
	return nil
}
