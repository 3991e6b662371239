"""The test S3 server itself: buckets and objects round-trip through boto3 and streaming's client."""

import boto3


def test_objects_round_trip(s3_server, s3_bucket, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"

    from streaming.base.storage.download import CloudDownloader

    CloudDownloader.direct_download(f"s3://{s3_bucket}/a/b.txt", str(tmp_path / "b.txt"), timeout=30)
    assert (tmp_path / "b.txt").read_bytes() == b"hello"
