package main

// topics.go creates the Kafka contract's topics at start, in production as
// with the embedded broker.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// ensureTopics creates the service's topics if they are missing, retrying
// while the broker is unreachable: the service starts and takes orders during
// a broker outage, and the outbox holds them until the topics exist.
func ensureTopics(ctx context.Context, cl *kgo.Client, log *slog.Logger, partitions int32, topics ...string) {
	adm := kadm.NewClient(cl)
	err := retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		resp, err := adm.CreateTopics(ctx, partitions, -1, nil, topics...)
		if err != nil {
			return err
		}
		for _, t := range resp.Sorted() {
			if t.Err != nil && !errors.Is(t.Err, kerr.TopicAlreadyExists) {
				return fmt.Errorf("create topic %s: %w", t.Topic, t.Err)
			}
		}
		return nil
	}, func(err error, wait time.Duration) bool {
		log.WarnContext(ctx, "kafka topics not created yet, retrying", "err", err, "retry_in", wait)
		return true
	})
	if err == nil {
		log.InfoContext(ctx, "kafka topics ready", "topics", topics)
	}
}
