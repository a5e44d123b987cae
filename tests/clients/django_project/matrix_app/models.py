from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100, unique=True)
    joined = models.DateTimeField(auto_now_add=True)


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    title = models.CharField(max_length=200)
    pages = models.IntegerField()
    data = models.JSONField(default=dict)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(pages__gt=0), name="book_pages_positive")]
