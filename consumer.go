package main

// consumer.go applies payment-results to orders, each exactly once, and sends
// records it can never apply to the dead-letter topic.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
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
		if recs := fetches.Records(); len(recs) > 0 {
			if err := c.processPoll(ctx, recs); err != nil {
				// Only shutdown stops processing; the poll stays
				// unmarked and is redelivered to the next owner.
				c.group.AllowRebalance()
				return
			}
			c.group.MarkCommitRecords(recs...)
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

// processPoll applies the records of one poll: all valid results in one
// transaction, then the ones that can never apply to the DLQ. Each step is
// retried while it fails transiently (database down, DLQ unwritable), until
// it succeeds or ctx ends: skipping would lose records.
func (c *consumer) processPoll(ctx context.Context, recs []*kgo.Record) error {
	type dead struct {
		rec   *kgo.Record
		cause error
	}
	type item struct {
		rec *kgo.Record
		res paymentResult
	}
	var poison []dead
	var batch []item // the first result per order in this poll
	var later []item // further results for an order already in batch
	seen := map[string]bool{}
	for _, rec := range recs {
		res, err := decodePaymentResult(rec.Value)
		switch {
		case err != nil:
			poison = append(poison, dead{rec, err})
		case seen[res.OrderID]:
			later = append(later, item{rec, res})
		default:
			seen[res.OrderID] = true
			batch = append(batch, item{rec, res})
		}
	}

	results := make([]paymentResult, len(batch))
	for i, it := range batch {
		results[i] = it.res
	}
	var applied map[string]bool
	if err := c.retry(ctx, "apply payment results", func(ctx context.Context) (err error) {
		applied, err = applyPaymentResults(ctx, c.db, results)
		return err
	}); err != nil {
		return err
	}
	var notApplied []item
	for _, it := range batch {
		if applied[it.res.OrderID] {
			c.metrics.resultsApplied(it.res.Status)
			c.log.InfoContext(ctx, "order status changed", "order_id", it.res.OrderID, "status", it.res.Status)
		} else {
			notApplied = append(notApplied, it)
		}
	}
	notApplied = append(notApplied, later...)
	if len(notApplied) > 0 {
		ids := make([]string, len(notApplied))
		for i, it := range notApplied {
			ids[i] = it.res.OrderID
		}
		var current map[string]string
		if err := c.retry(ctx, "read order statuses", func(ctx context.Context) (err error) {
			current, err = orderStatuses(ctx, c.db, ids)
			return err
		}); err != nil {
			return err
		}
		for _, it := range notApplied {
			status, known := current[it.res.OrderID]
			switch {
			case !known:
				poison = append(poison, dead{it.rec, fmt.Errorf("%w: unknown order %s", errPoison, it.res.OrderID)})
			case status == it.res.Status:
				c.metrics.resultsIgnored.Add(1)
				c.log.InfoContext(ctx, "duplicate payment result ignored", "order_id", it.res.OrderID, "status", status)
			default:
				c.metrics.resultsIgnored.Add(1)
				c.log.WarnContext(ctx, "conflicting payment result ignored", "order_id", it.res.OrderID,
					"status", status, "result", it.res.Status)
			}
		}
	}

	// Poison in log order, so the DLQ keeps each partition's order.
	slices.SortFunc(poison, func(a, b dead) int {
		return cmp.Or(cmp.Compare(a.rec.Partition, b.rec.Partition), cmp.Compare(a.rec.Offset, b.rec.Offset))
	})
	for _, d := range poison {
		if err := c.retry(ctx, "dead-letter", func(ctx context.Context) error { return c.deadLetter(ctx, d.rec, d.cause) }); err != nil {
			return err
		}
	}
	return nil
}

// retry runs step until it succeeds or ctx ends, with capped backoff.
func (c *consumer) retry(ctx context.Context, what string, step func(context.Context) error) error {
	for failures := 1; ; failures++ {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := step(sctx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := backoff(failures)
		c.log.WarnContext(ctx, "consumer: "+what+" failed, retrying", "err", err, "retry_in", d)
		sleep(ctx, d)
	}
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
	if err := c.producer.ProduceSync(ctx, dlq).FirstErr(); err != nil {
		return fmt.Errorf("dead-letter offset %d: %w", rec.Offset, err)
	}
	c.metrics.resultsDeadLettered.Add(1)
	c.log.WarnContext(ctx, "payment result sent to DLQ", "partition", rec.Partition, "offset", rec.Offset, "err", cause)
	return nil
}
