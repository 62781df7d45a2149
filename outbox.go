package main

// outbox.go is the relay: it moves committed outbox rows to Kafka.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

type relay struct {
	db    *pgxpool.Pool
	kafka *kgo.Client
	log   *slog.Logger

	batchSize      int
	workers        int           // publishBatch loops side by side in a backlog
	pollInterval   time.Duration // fallback when a NOTIFY is lost
	produceTimeout time.Duration // bounds how long a batch holds its row locks
	retention      time.Duration // published rows older than this are purged
	purgeInterval  time.Duration
	metrics        *metrics

	wake <-chan struct{} // new outbox rows announced, or the listener reconnected
}

const (
	purgeBatchSize = 1000
	maxBackoff     = 5 * time.Second
)

// run publishes until ctx is cancelled, then returns after the batches in
// flight have been published and marked, or rolled back when abort ends
// first (shutdown's budget is spent): their rows stay in the outbox for the
// next run.
//
// One worker waits for new rows and backs off when publishing fails. It
// calls the others in only for a backlog, when it took a full batch: then
// they claim batches side by side, each skipping the rows the others'
// locks hold, one producing while another is in the database.
func (r *relay) run(ctx, abort context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { r.purgeLoop(ctx) })
	help := make(chan struct{}, 1)
	for range r.workers - 1 {
		wg.Go(func() { r.assist(ctx, abort, help) })
	}
	var failures int
	for ctx.Err() == nil {
		n, err := r.publishBatch(abort)
		if err != nil {
			failures++
			d := backoff(failures)
			r.metrics.publishErrors.Add(1) // before the log line: a reader of the line finds it counted
			r.log.WarnContext(ctx, "relay: publish failed, retrying", "err", err, "retry_in", d)
			if r.pause(ctx, d, brokerUnavailable(err)) {
				failures = 0 // a new start: the broker is back
			}
			continue
		}
		failures = 0
		if n == r.batchSize {
			askHelp(help)
			continue // a full batch: more are likely waiting
		}
		select {
		case <-ctx.Done():
		case <-r.wake:
		case <-time.After(jitter(r.pollInterval)):
		}
	}
}

// assist is one of the other workers: asked for help, it publishes batches
// while they come full, then waits to be asked again. It never retries: a
// failure is the first worker's to back off from, and new rows its to see.
func (r *relay) assist(ctx, abort context.Context, help chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-help:
		}
		for ctx.Err() == nil {
			n, err := r.publishBatch(abort)
			if err != nil {
				r.metrics.publishErrors.Add(1)
				r.log.WarnContext(ctx, "relay: publish failed, leaving the rest to the first worker", "err", err)
				break
			}
			if n < r.batchSize {
				break
			}
			askHelp(help)
		}
	}
}

// askHelp wakes an idle worker, if one is waiting to be asked.
func askHelp(help chan struct{}) {
	select {
	case help <- struct{}{}:
	default:
	}
}

// newProducerClient is the relay's producer (the consumer's DLQ copies use it
// too).
func newProducerClient(brokers []string) (*kgo.Client, error) {
	return kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service"),
		kgo.WithHooks(noteProduceEnd{}),
		// acks=all and idempotent writes are kgo's defaults. This lets the
		// relay's deadline fail even in-flight records, so a stalled
		// broker cannot hold outbox row locks forever; the price is a
		// possible duplicate, which at-least-once delivery allows anyway.
		kgo.AllowIdempotentProduceCancellation(),
		// While brokers are unreachable kgo fails a record only after a
		// metadata refresh, and refreshes at most every MetadataMinAge (5s)
		// with backoff up to 2.5s between tries: a 1s RELAY_PRODUCE_TIMEOUT
		// took 4-7s, and a returned cluster was noticed as late. Refreshing
		// at most four times a second and retrying within 250ms costs a few
		// requests a second, only while something is failing.
		kgo.MetadataMinAge(250*time.Millisecond),
		kgo.RetryBackoffFn(func(tries int) time.Duration {
			return jitter(min(250*time.Millisecond, 25*time.Millisecond<<min(tries, 4)))
		}),
	)
}

// publishBatch claims, produces and marks one batch in one transaction. The
// produce deadline bounds how long row locks are held; ctx is not the run's
// ctx but its abort: shutdown lets the current batch finish if it can.
func (r *relay) publishBatch(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, r.produceTimeout+10*time.Second)
	defer cancel()

	b := &pgx.Batch{} // BEGIN and the claim in one round trip
	b.BeginTx(pgx.TxOptions{})
	queuePlannerOff(b, "enable_sort", "enable_seqscan")
	claim := queueClaimOutbox(b, r.batchSize)
	br := r.db.SendBatch(ctx, b)
	tx := br.Tx()
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit
	if err := br.Close(); err != nil {
		return 0, fmt.Errorf("claim: %w", err)
	}
	claimed := *claim
	if len(claimed) == 0 {
		return 0, nil
	}

	// Each record's context holds where noteProduceEnd writes when its
	// produce ended: a batch ends with its slowest partition, which may
	// retry for seconds while the others were written at once.
	pctx, pcancel := context.WithTimeout(ctx, r.produceTimeout)
	ended := make([]time.Time, len(claimed))
	recs := make([]*kgo.Record, len(claimed))
	for i, row := range claimed {
		// The record timestamp is left to the client (now): a backlog
		// published late must not inherit an age that retention would
		// delete at once.
		recs[i] = &kgo.Record{
			Topic:   row.Topic,
			Key:     []byte(row.Key),
			Value:   row.Payload,
			Headers: []kgo.RecordHeader{{Key: "event-id", Value: []byte(row.EventID)}},
			Context: context.WithValue(pctx, produceEndKey{}, &ended[i]),
		}
		if row.Traceparent != nil {
			recs[i].Headers = append(recs[i].Headers, kgo.RecordHeader{Key: "traceparent", Value: []byte(*row.Traceparent)})
		}
		if row.Tracestate != nil {
			recs[i].Headers = append(recs[i].Headers, kgo.RecordHeader{Key: "tracestate", Value: []byte(*row.Tracestate)})
		}
	}
	// ProduceSync, not a loop of Produce: it sends what it was given at
	// once, where Produce would wait out the client's linger (10ms).
	results := r.kafka.ProduceSync(pctx, recs...)
	pcancel()
	// Mark what the broker acknowledged, even when some records failed: a
	// partition without a leader must not hold back the events of the
	// others. The failed rows stay unpublished and are released at commit
	// for the next try; a failed record that did reach the broker will be
	// sent again: at least once.
	index := make(map[*kgo.Record]int, len(recs)) // results come in completion order
	for i, rec := range recs {
		index[rec] = i
	}
	var published []outboxRow
	var publishedRows []pgtype.TID
	var publishedAt []time.Time
	var produceErr error
	for _, res := range results {
		if res.Err != nil {
			produceErr = cmp.Or(produceErr, res.Err)
			continue
		}
		i := index[res.Record]
		published = append(published, claimed[i])
		publishedRows = append(publishedRows, claimed[i].CTID)
		publishedAt = append(publishedAt, ended[i])
	}
	if len(published) > 0 {
		// A crash from here to Commit repeats these on the next claim; the
		// consumer of pay-order dedupes on event_id.
		if err := markPublished(ctx, tx, publishedRows, publishedAt); err != nil {
			return 0, err
		}
		if err := tx.Commit(ctx); err != nil {
			return 0, fmt.Errorf("commit published batch: %w", err)
		}
		r.metrics.eventsPublished.Add(int64(len(published)))
		r.metrics.relayBatch.observe(float64(len(published)))
		for i, row := range published {
			// created_at is the order transaction's start, within
			// milliseconds of its commit.
			r.metrics.publishLatency.observe(publishedAt[i].Sub(row.CreatedAt).Seconds())
		}
	}
	if produceErr != nil {
		return len(published), fmt.Errorf("produce %d of %d records: %w", len(recs)-len(published), len(recs), produceError{produceErr})
	}
	return len(published), nil
}

// produceEndKey keys, in a relay record's context, the *time.Time where
// noteProduceEnd writes when its produce ended. ProduceSync's results say
// how each ended; only the hook sees when.
type produceEndKey struct{}

// noteProduceEnd is the producer's kgo hook: kgo calls it just before a
// record's promise, as the broker's answer (or the deadline) ends that
// record, not when the last record of its batch ends.
type noteProduceEnd struct{}

func (noteProduceEnd) OnProduceRecordUnbuffered(rec *kgo.Record, _ error) {
	if at, ok := rec.Context.Value(produceEndKey{}).(*time.Time); ok {
		*at = time.Now()
	}
}

// produceError marks a batch that failed at the broker, not at the database.
type produceError struct{ err error }

func (e produceError) Error() string { return e.err.Error() }
func (e produceError) Unwrap() error { return e.err }

// brokerUnavailable says a batch failed because the cluster did not take it
// (unreachable, no leader, too few replicas, out of time), not because of
// the database or of what the records are: a broker refusal that retrying
// cannot cure (too large, not authorized) is the records' problem.
func brokerUnavailable(err error) bool {
	var pe produceError
	if !errors.As(err, &pe) {
		return false
	}
	var ke *kerr.Error
	return !errors.As(err, &ke) || ke.Retriable
}

// pause waits d after a failed batch, but no longer than it takes a broker
// that stopped answering to answer again: the backlog of an outage leaves
// within a second of the cluster's return, not after the backoff. It asks
// every 200ms (an ApiVersions request). down says the failure was the
// broker's: then its first answer after the first step ends the pause, even
// if it answers all along (the cluster may have returned while the produce
// was failing, or a partition may be waiting for a leader: the next try
// waits for that, within its own deadline). The first step is kept so that
// a produce that fails at once is not retried in a tight loop. Otherwise
// (the database failed) only a broker seen down and then answering ends the
// pause early. back says the broker was seen to return.
func (r *relay) pause(ctx context.Context, d time.Duration, down bool) (back bool) {
	const every = 200 * time.Millisecond
	start := time.Now()
	until := start.Add(d)
	seenDown := false
	for ctx.Err() == nil {
		left := time.Until(until)
		if left <= 0 {
			return false
		}
		step := time.Now().Add(min(every, left))
		pctx, cancel := context.WithDeadline(ctx, step)
		err := r.kafka.Ping(pctx)
		cancel()
		switch {
		case err != nil:
			down, seenDown = true, true
		case seenDown:
			return true
		case down && time.Since(start) >= every:
			return false
		}
		sleep(ctx, time.Until(step))
	}
	return false
}

// purgeLoop deletes published rows past their retention, on its own timer so
// that neither a busy nor an idle relay delays it.
func (r *relay) purgeLoop(ctx context.Context) {
	t := time.NewTicker(r.purgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for ctx.Err() == nil {
			n, err := purgePublished(ctx, r.db, r.retention, purgeBatchSize)
			if err != nil {
				if ctx.Err() == nil {
					r.log.WarnContext(ctx, "relay: purge failed", "err", err)
				}
				break
			}
			if n < purgeBatchSize {
				break
			}
		}
	}
}

// backoff is capped exponential backoff with jitter: 100ms, 200ms, ... 5s.
func backoff(failures int) time.Duration {
	d := maxBackoff
	if failures < 7 {
		d = min(maxBackoff, 100*time.Millisecond<<(failures-1))
	}
	return jitter(d)
}

// jitter adds up to 10% so that replicas do not poll in lockstep.
func jitter(d time.Duration) time.Duration {
	return d + rand.N(d/10+1)
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
